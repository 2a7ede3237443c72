"""Ctrl-C (SIGINT) and SIGTERM: a long run stops where it can be resumed, and says how.

* ``train`` (:class:`GracefulStop`): the first signal only sets a flag. The training loop asks
  :meth:`GracefulStop.requested` at every step boundary and at the end of each segment; it then saves a
  resumable checkpoint and returns, and the command exits with 128 + the signal number after printing the
  ``--resume`` to use. Under DDP the question is collective: one ``all_reduce(MAX)`` of a 1-element CPU
  tensor per step on a gloo group (on GPU jobs a separate gloo group, so the check never waits for the CUDA
  stream), so every rank stops after the same step even when only one rank got the signal. A second signal
  stops at once (:class:`Interrupted`, a KeyboardInterrupt): the last checkpoint written is what resumes.
  A second signal less than :data:`REPEAT_S` after the first counts as the same request: a terminal's
  Ctrl-C reaches torchrun's workers directly and again through torchrun, which forwards it.
  torchrun kills workers that have not exited 30 s after it forwarded a signal, so a signal that arrives
  during validation (minutes on ImageNet) may end in that kill: the previous checkpoint then resumes.
* every other command (:func:`terminate_like_ctrl_c`): SIGTERM stops like Ctrl-C (KeyboardInterrupt), so
  ``generate`` ends the same way for both and the CLI prints how to resume.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Iterator


REPEAT_S = 1.0
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """Stopped at once by a signal (the first SIGTERM of a command, or the second signal of a train run)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_code(signum: int) -> int:
    return 128 + int(signum)


def _raise(signum, frame) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def terminate_like_ctrl_c() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt (as SIGINT does) in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class GracefulStop:
    """Signal handlers for one training run (a context manager); :meth:`requested` is collective in DDP."""

    def __init__(self, distributed: bool):
        self.signum: int | None = None  # the signal this rank got, or learned from another rank
        self._first: float | None = None  # when this process got its first signal
        self._previous: dict = {}
        self._group = None
        if distributed:
            import torch.distributed as dist  # noqa: PLC0415 - the CLI imports this module before torch
            self._group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self._first is not None:
            if time.monotonic() - self._first > REPEAT_S:
                self.__exit__()
                raise Interrupted(signum)
            return
        self._first = time.monotonic()
        if self.signum is None:
            self.signum = signum
            print(f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint (send it again "
                  "to stop at once)", file=sys.stderr, flush=True)

    def requested(self) -> bool:
        """True, on every rank, once any rank got a signal. In DDP every rank must call it at the same point."""
        if self._group is None:
            return self.signum is not None
        import torch  # noqa: PLC0415
        import torch.distributed as dist  # noqa: PLC0415
        flag = torch.tensor([self.signum or 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        if flag.item() and self.signum is None:
            self.signum = int(flag.item())
        return bool(flag.item())

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum else None
