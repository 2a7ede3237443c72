"""Run by tests/test_relabel_train.py under torchrun: a few DDP steps on a relabel store (--labels relabel); each
rank writes the (store row, position) pairs it trained on per step and its weights."""

import json
import os
import sys

import torch

from fkd_dali.train import Trainer, TrainConfig


def main(data: str, store: str, out: str) -> None:
    cfg = TrainConfig(data=data, arch="tiny_cnn", labels="relabel", softlabel_path=store, batch_size=2, epochs=2,
                      input_size=32, device="cpu", output=os.path.join(out, "run"), show_progress=False, lr=0.05,
                      temperature=3.0, warmup_epochs=0, val_batch_size=8)
    trainer = Trainer(cfg)
    seen, step = [], trainer.step

    def recording(batch, lr):
        seen.append([batch["indices"].tolist(), batch["positions"].tolist()])
        return step(batch, lr)

    trainer.step = recording
    trainer.run()
    rank = trainer.dist.rank
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(seen, f)
    weights = {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()}
    torch.save(weights, os.path.join(out, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(*sys.argv[1:])
