"""The whole GPU check in one command, within a time budget (docs/gpu-check.md): the doctor, then the GPU-only
tests, then the rest of the test suite on the device, each bounded by what is left; every log and a summary
land in ``--out`` (at most 6 files, so they all come back from a lent machine).

    python3 -m fkd_dali.doctor.session --device gpu --out "$OUT" --budget 540

Rehearse it without a GPU with ``--device cpu``: the same steps run (the GPU-only tests skip).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The whole CPU-or-GPU suite is started only with at least this much of the budget left (it cannot finish in less).
SUITE_MIN_SECONDS = 60.0


def _run(cmd: list[str], log: str, timeout: float, env: dict) -> tuple[str, float]:
    """Run ``cmd`` with its output in ``log``; returns (outcome, seconds)."""
    t = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                timeout=max(1.0, timeout)).returncode
            outcome = "passed" if rc == 0 else f"exit {rc}"
        except subprocess.TimeoutExpired:
            outcome = f"stopped at its {timeout:.0f} s share of the budget"
    return outcome, time.perf_counter() - t


def _tail(path: str, lines: int = 3) -> str:
    with open(path, errors="replace") as f:
        return " / ".join(x.strip() for x in f.read().strip().splitlines()[-lines:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fkd_dali.doctor.session", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "gpu"), default="gpu")
    p.add_argument("--out", required=True)
    p.add_argument("--budget", type=float, default=540.0, help="seconds for everything (default 540)")
    p.add_argument("--doctor-deadline", type=float, default=None, help="default: 2/3 of the budget, at most 360 s")
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1", FKD_TEST_DEVICE=a.device,
               PYTHONPATH=os.pathsep.join([ROOT] + [x for x in [os.environ.get("PYTHONPATH")] if x]))
    left = lambda: a.budget - (time.perf_counter() - t0)  # noqa: E731
    deadline = a.doctor_deadline or min(360.0, 2 * a.budget / 3)
    steps = []
    doctor = [sys.executable, "-m", "fkd_dali", "doctor", "--device", a.device, "--out", a.out, "--deadline",
              str(deadline)]
    steps.append(("doctor", *_run(doctor, os.path.join(a.out, "doctor.log"), deadline + 60, env),
                  os.path.join(a.out, "doctor.log")))
    pytest = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider"]
    log = os.path.join(a.out, "pytest-gpu.log")
    steps.append(("GPU-only tests (pytest -m gpu)", *_run(pytest + ["-m", "gpu", "tests/test_gpu.py"], log,
                                                          left() - 5, env), log))
    log = os.path.join(a.out, "pytest-device.log")
    if left() > SUITE_MIN_SECONDS:
        steps.append((f"test suite on the {a.device} (FKD_TEST_DEVICE={a.device})",
                      *_run(pytest + ["-m", "not gpu", "--durations=5"], log, left() - 5, env), log))
    else:
        steps.append((f"test suite on the {a.device}", "not started: budget used up", 0.0, None))
    lines = [f"# GPU check session ({a.device}, {time.perf_counter() - t0:.0f} s of a {a.budget:.0f} s budget)", "",
             "| step | outcome | seconds | last lines |", "|---|---|---|---|"]
    for name, outcome, secs, path in steps:
        tail = _tail(path).replace("|", "\\|") if path and os.path.exists(path) else ""
        lines.append(f"| {name} | {outcome} | {secs:.0f} | {tail} |")
    summary = "\n".join(lines) + "\n"
    with open(os.path.join(a.out, "session.md"), "w") as f:
        f.write(summary)
    print(summary)
    return 0 if all(o == "passed" for _, o, _, _ in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
