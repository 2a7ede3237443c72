"""Run by tests under torchrun: a few DDP training steps; each rank writes the rows it trained on and its
weights, so the test can check disjoint shards and identical replicas. With FKD_TEST_DIE_RANK and
FKD_TEST_DIE_STEP set, that rank SIGKILLs itself after that step (a rank lost mid-training); with
FKD_TEST_SIGNAL=TERM (or INT) it sends itself that signal instead (a stop asked of one rank only). With
FKD_TEST_MEAL_INIT=CHECKPOINT it trains Fast MEAL V2 (discriminator on) from that checkpoint and also writes
each rank's discriminator at the start and the end. With FKD_TEST_SSL=1 it trains --recipe s2-bnn (--labels ssl) from
an embedding store; with FKD_TEST_MOCO=1 it trains --labels moco (a ResNet-18, no store: give '-') and also
writes each rank's queue."""

import json
import os
import signal
import sys

import torch

from fkd_dali.train import Trainer, TrainConfig, recipe_config


def main(data: str, store: str, out: str, *extra: str) -> None:
    die_rank, die_step = int(os.environ.get("FKD_TEST_DIE_RANK", -1)), int(os.environ.get("FKD_TEST_DIE_STEP", 0))
    sig = getattr(signal, "SIG" + os.environ.get("FKD_TEST_SIGNAL", "KILL"))
    timeout = float(extra[extra.index("--dist-timeout") + 1]) if "--dist-timeout" in extra else 600.0
    common = dict(data=data, arch="tiny_cnn", softlabel_path=store, num_crops=2, batch_size=16, epochs=4,
                  input_size=32, device=os.environ.get("FKD_TEST_DEVICE", "cpu"), output=os.path.join(out, "run"),
                  max_steps=3 if die_rank < 0 else None, show_progress=False, dist_timeout=timeout)
    meal_init = os.environ.get("FKD_TEST_MEAL_INIT")  # Fast MEAL V2 from this checkpoint, discriminator on
    if os.environ.get("FKD_TEST_MOCO"):  # MoCo v2: no store, a model with a Linear fc for the MLP head
        common.update(softlabel_path=None, arch="resnet18", labels="moco", temperature=0.2, moco_k=12, moco_m=0.9,
                      moco_dim=16, batch_size=8, amp=False)
    cfg = TrainConfig(lr=0.05, **common) if os.environ.get("FKD_TEST_MOCO") else \
        recipe_config("meal-v2", init_from=meal_init, **common) if meal_init else \
        recipe_config("s2-bnn", lr=0.01, **common) if os.environ.get("FKD_TEST_SSL") else \
        TrainConfig(lr=0.05, cos=True, **common)
    trainer = Trainer(cfg)
    disc = getattr(trainer.objective, "disc", None)  # Fast MEAL V2's discriminator
    if disc is not None:
        disc_start = {k: v.clone() for k, v in disc.state_dict().items()}
    seen = []
    step = trainer.step

    def recording_step(batch, lr):
        seen.append(sorted(set(batch["indices"].tolist())))
        if trainer.dist.rank == die_rank and len(seen) == die_step + 1:
            os.kill(os.getpid(), sig)
        return step(batch, lr)

    trainer.step = recording_step
    rank = trainer.dist.rank
    model = trainer.model
    result = trainer.run()
    with open(os.path.join(out, f"rank{rank}.result.json"), "w") as f:
        json.dump({"global_step": result["global_step"], "interrupted": result["interrupted"]}, f)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(seen, f)
    # Parameters are what DDP keeps identical; BatchNorm's running statistics (buffers) are each rank's own
    # until DDP broadcasts rank 0's at the next forward, and checkpoints hold rank 0's.
    torch.save({n: p.detach() for n, p in model.named_parameters()}, os.path.join(out, f"rank{rank}.pt"))
    moco = trainer.objective
    if getattr(moco, "queue", None) is not None:
        torch.save({"queue": moco.queue.cpu(), "queue_ptr": moco.queue_ptr}, os.path.join(out, f"rank{rank}.queue.pt"))
    if disc is not None:  # DDP made every rank's start rank 0's; the steps keep them equal
        torch.save({"start": disc_start, "end": disc.state_dict()}, os.path.join(out, f"rank{rank}.disc.pt"))


if __name__ == "__main__":
    main(*sys.argv[1:])
