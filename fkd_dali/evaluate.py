"""Top-1 / top-5 on the validation view, sharded over ranks, each image counted once."""

from __future__ import annotations

import torch
import torch.distributed as dist

from pipelines import EvalLoader


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: EvalLoader, *, amp: bool = False, group: bool = False) -> dict:
    """Accuracy of ``model`` over ``loader``; with a process group, each rank's padded duplicates are left out
    (sample i of rank r sits at global position r + i * world: real iff that is < N) and counts are summed."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    n_real = loader.reader.num_rows
    rank, world = loader.reader.rank, loader.reader.world_size
    counts = torch.zeros(3, dtype=torch.float64, device=dev)  # top-1, top-5, images
    i = 0
    for batch in loader:
        x, target = batch["images"], batch["targets"].to(dev)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            out = model(x)
        pos = rank + world * torch.arange(i, i + len(target), device=dev)
        real = pos < n_real
        i += len(target)
        top = out.float().topk(min(5, out.shape[1]), dim=1).indices
        counts[0] += ((top[:, 0] == target) & real).sum()
        counts[1] += ((top == target[:, None]).any(dim=1) & real).sum()
        counts[2] += real.sum()
    if group:
        dist.all_reduce(counts)
    model.train(was_training)
    n = max(1.0, counts[2].item())
    return {"top1": 100.0 * counts[0].item() / n, "top5": 100.0 * counts[1].item() / n, "images": int(counts[2].item())}
