"""One rank of the doctor's DDP smoke test (run by torchrun): three training steps from the store with a
DALI pipeline on the rank's device; writes the rows of each step, a checksum of the weights, the device and
the cores it ran on, for the parent to compare across ranks.

    torchrun --nproc_per_node N -m fkd_dali.doctor.ddp_worker DATA STORE OUT DEVICE [BACKEND]
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist


def main(data: str, store: str, out: str, device: str, backend: str = "") -> None:
    from fkd_dali.train import TrainConfig, Trainer
    cfg = TrainConfig(data=data, arch="resnet18", softlabel_path=store, num_crops=2, batch_size=16, epochs=4,
                      input_size=32, device=device, output=os.path.join(out, "run"), max_steps=3,
                      show_progress=False, lr=0.05, dist_backend=backend or None, dist_timeout=120)
    trainer = Trainer(cfg)
    rows = []
    step = trainer.step

    def recording(batch, lr):
        rows.append(sorted(set(batch["indices"].tolist())))
        return step(batch, lr)

    trainer.step = recording
    rank = trainer.dist.rank
    used = dist.get_backend() if dist.is_initialized() else "none"
    model = trainer.model
    trainer.run()
    flat = torch.cat([p.detach().double().flatten().cpu() for p in model.parameters()])
    report = {"rank": rank, "backend": used, "rows": rows,
              "weights": f"{float(flat.sum()):.10e}/{float(flat.abs().sum()):.10e}",
              "device": str(next(model.parameters()).device), "cpus": sorted(os.sched_getaffinity(0))}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
