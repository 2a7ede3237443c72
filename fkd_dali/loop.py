"""The training loop, as plain functions in the spirit of torchvision's reference script: a step
(:func:`train_step`), a segment (:func:`train_segment`), a run (:func:`train_run`). Each takes ``run``, a
:class:`~fkd_dali.trainer.Trainer` (the run's state, which calls them: this module does not import it), and asks
the run's objective for targets and losses; no way of learning is named here.

A segment is ``n`` epochs trained as one pass over the images with ``n`` crops each (FKD's plan) or one
ordinary epoch; after it come validation (every ``--eval-every`` segments and the last), the log record, the
checkpoint and the printed line. The plan and the learning rate per step are pure functions of the options
(:mod:`fkd_dali.schedule`), the data order of ``(seed, epoch)``, the mixing of ``(seed, step)``; a checkpoint
stores the position, weights, optimizers, EMA and every rank's RNG, so ``--resume`` continues the same run.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import torch
import torch.distributed as dist

from . import checkpoint
from .interrupt import GracefulStop
from .mixing import mix_images
from .objectives.base import Mix
from .progress import format_eta, progress
from .schedule import Segment, pass_index
from .train_config import TrainError


def train_step(run, batch: dict[str, torch.Tensor], lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on ``batch`` at learning rate ``lr``: the objective's targets (no gradient), the
    seeded Mixup/CutMix of the images, the student's forward pass, the objective's loss, backward, the student's
    and the objective's optimizers, EMA. Returns the loss the log reports and the training top-1 (tensors, not
    synchronised; the top-1 None when the objective reports none); the objective's other values of the step are
    in ``run.step_metrics``."""
    cfg, objective = run.cfg, run.objective
    x = batch["images"]
    for g in run.optimizer.param_groups:
        g["lr"] = lr
    with torch.no_grad():
        targets = objective.targets(run, batch, x)
        mix = None
        if run.mix_cfg is not None:
            x, perm, lam, _ = mix_images(x, run.mix_cfg, cfg.seed, run.global_step)
            mix = Mix(perm, lam) if perm is not None else None
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=run.amp):
        out = run.ddp(x)
    loss = objective.loss(run, out, targets, mix)
    run.optimizer.zero_grad(set_to_none=True)
    objective.zero_grad()
    loss.total.backward()
    if cfg.clip_grad:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.clip_grad)
    run.optimizer.step()
    objective.step()
    if run.ema is not None:
        run.ema.update_parameters(run.model)
    run.global_step += 1
    run.step_metrics = loss.metrics
    top1 = objective.top1(out, batch["targets"].to(run.torch_device)) if objective.reports_top1 else None
    return loss.value.detach(), top1


# ---------------------------------------------------------------------------------------------- a segment
def running_sums(run, carried: dict | None) -> dict[str, Any]:
    """The segment's running sums on this rank (tensors on the device): loss, top-1 (when the objective reports
    one), the objective's metrics, steps; ``carried`` are the sums a checkpoint held for the segment it stopped in."""
    carried = carried or {}
    top1 = ("top1",) if run.objective.reports_top1 else ()
    sums = {name: torch.tensor(carried.get(name, 0.0), device=run.torch_device)
            for name in ("loss", *top1, *run.objective.metrics)}
    return {"sums": sums, "steps": carried.get("steps", 0),
            "first_bad": torch.tensor(FINITE, device=run.torch_device)}


def partial_sums(running: dict | None) -> dict | None:
    """Running sums as a checkpoint keeps them (floats), None between segments."""
    if running is None:
        return None
    return {**{name: float(v.item()) for name, v in running["sums"].items()}, "steps": running["steps"]}


def train_segment(run, seg: Segment, log, tb) -> bool:
    """Train one segment (from the resume position); returns True when --max-steps or a signal stopped the run
    (after saving a checkpoint)."""
    cfg = run.cfg
    if cfg.max_steps is not None and run.global_step >= cfg.max_steps:
        return True  # a resumed run that is already there
    run.release_loaders(keep=seg.crops)  # e.g. the n-crop pipeline once the single-crop tail starts
    loader = run.loader(seg.crops)
    start = run.position[1] if run.position[0] == seg.index else 0
    steps = len(loader)
    total = run_steps(run, loader.reader.num_rows)
    loader.set_epoch(pass_index(run.segments, seg), start_batch=start)
    run.position = (seg.index, start)
    run.train_mode()
    label = f"epoch {seg.start_epoch}" + (f"-{seg.end_epoch - 1}" if seg.crops > 1 else "")
    bar = segment_bar(run, label, steps, start, total)
    run.running = running_sums(run, run.partial if start > 0 else None)
    run.partial = None
    sums = run.running["sums"]
    crops = 0
    t0 = time.perf_counter()
    stopped = False
    lr = run.lr_at(seg.start_epoch + seg.crops * max(0, start - 1) / steps)  # a resume after its last step
    for i, batch in enumerate(loader, start=start):
        lr = run.lr_at(seg.start_epoch + seg.crops * i / steps)
        loss, top1 = run.step(batch, lr)
        watch_loss(run.running, loss, run.global_step)
        sums["loss"] += loss
        if top1 is not None:
            sums["top1"] += top1
        for name in run.objective.metrics:
            sums[name] += run.step_metrics[name]
        run.running["steps"] += 1
        n = run.running["steps"]  # steps of this segment so far on this rank (before a resume too)
        crops += batch["images"].shape[0]
        run.position = (seg.index, i + 1)
        if n % CHECK_EVERY == 0 or i + 1 == steps:
            check_finite(run, lr)
        if run.main and (n % CHECK_EVERY == 0 or i + 1 == steps):
            rate = crops * run.dist.world_size / max(1e-9, time.perf_counter() - t0)
            top1_now = 100 * sums["top1"].item() / n if "top1" in sums else None
            bar.set_postfix(bar_postfix(run, label, sums["loss"].item() / n, top1_now, rate, lr, total),
                            refresh=False)
        bar.update(1)
        if run.stop.requested() or (cfg.max_steps is not None and run.global_step >= cfg.max_steps):
            stopped = True
            break
        if cfg.checkpoint_every and run.global_step % cfg.checkpoint_every == 0 and i + 1 < steps:
            check_finite(run, lr, saving=True)
            run.save()
    if bar is not run.run_bar:
        bar.close()
    seconds = time.perf_counter() - t0
    if stopped:
        check_finite(run, lr, saving=True)
        run.save()
        return True
    n = run.running["steps"]
    run.position = (seg.index + 1, 0)
    run.running = None
    if run.dist.group:
        for v in sums.values():
            dist.all_reduce(v)
    world = run.dist.world_size
    steps_all = max(1, n * world)
    record = {"segment": seg.index, "epochs": [seg.start_epoch, seg.end_epoch], "crops_per_image": seg.crops,
              "train_loss": sums["loss"].item() / steps_all,
              **({"train_top1": 100 * sums["top1"].item() / steps_all} if "top1" in sums else {}), "lr": lr,
              "steps": n, "seconds": seconds, "crops_per_s": crops * world / max(1e-9, seconds)}
    record.update({f"train_{name}": sums[name].item() / steps_all for name in run.objective.metrics})
    if start:  # loss and top-1 cover the whole segment (carried in the checkpoint); the timing does not
        record["resumed_at_step"] = start
    check_finite(run, lr, saving=True, running=False)  # the segment's losses were checked at its last step
    is_best = False
    if validates_after(run, seg):
        record.update(run.objective.validate(run) or {})
        key = run.objective.best_key
        if key in record:
            is_best = record[key] > run.best_top1
            run.best_top1 = max(run.best_top1, record[key])
    run.history.append(record)
    if run.save_due(seg):
        run.save(is_best)
    elif is_best:
        run.save(is_best, last=False)
    if run.main:
        report(run, record, label, total, log, tb, seg)
    if run.stop.requested():  # a signal during validation: this position's checkpoint resumes
        if run.saved_at != run.position:
            run.save()
        return True
    return False


# ---------------------------------------------------------------------------------------------- a ruined run
# A non-finite loss (a --temp near 0, a --lr too high, an overflow) turns every weight into nan within a step or two,
# and every later step and checkpoint would carry them. Looking at each step's loss from the host would stall the
# device's queue once per step, so each step only records on the device the first step whose loss was not finite
# (a few element-wise kernels), and the host looks at it where it waits for the device anyway: every CHECK_EVERY
# steps (the progress figures), and before every checkpoint together with the weights themselves. A ruined run
# stops there, at most CHECK_EVERY - 1 steps later, naming the step; no checkpoint of its weights is written, so the
# last one written stays the last good one.
CHECK_EVERY = 10
FINITE = 1 << 62  # ``first_bad`` while every loss was finite


def watch_loss(running: dict, loss: torch.Tensor, step: int) -> None:
    """Record ``step`` on the device if its loss is not finite and no earlier step's was (no host sync)."""
    running["first_bad"] = torch.where(torch.isfinite(loss), running["first_bad"],
                                       running["first_bad"].clamp(max=step))


def check_finite(run, lr: float, saving: bool = False, running: bool = True) -> None:
    """Stop the run (TrainError) once a step's loss was not finite or, before a checkpoint (``saving``), when a
    weight is not; every rank calls it at the same points (one all-reduce under DDP)."""
    own = run.running["first_bad"] if running else torch.tensor(FINITE, device=run.torch_device)
    ruined = torch.tensor(False, device=run.torch_device)
    if saving:
        states = [t for t in (*run.model.parameters(), *run.model.buffers()) if t.is_floating_point()]
        ruined = ~torch.stack([torch.isfinite(t).all() for t in states]).all()
    bad = torch.where(ruined, own.clamp(max=run.global_step), own)
    if run.dist.group:
        dist.all_reduce(bad, op=dist.ReduceOp.MIN)
    step = int(bad.item())
    if step == FINITE:
        return
    what = ("the training loss" if int(own.item()) == step else "the weights" if bool(ruined.item()) else
            "the training loss of another rank")
    last = os.path.join(run.cfg.output, checkpoint.LAST)
    kept = (f"the last checkpoint written, {checkpoint.describe(last)}, is left as it was" if os.path.exists(last)
            else "no checkpoint was written yet")
    raise TrainError(
        f"{what} became nan or inf at step {step} (--lr {run.cfg.lr:g}, {lr:.3g} at step {run.global_step}; --temp "
        f"{run.cfg.temperature:g}): training stopped without saving those weights; {kept}. Likely causes: a "
        "learning rate too high for this model and batch (try a tenth of it, or --clip-grad), a temperature near 0 "
        "(--temp), a label store or images that changed. Start the run again with other options (--overwrite, or "
        "another --output)")


def report(run, record: dict, label: str, total: int, log, tb, seg: Segment) -> None:
    """A finished segment's printed line (or the whole-run bar's validation figure), log record and TensorBoard
    scalars (rank 0)."""
    if run.cfg.progress_style == "epoch":
        val = f"val top-1 {record['val_top1']:.2f}%  top-5 {record['val_top5']:.2f}%  " if "val_top1" in record else ""
        top1 = f"train top-1 {record['train_top1']:.2f}%  " if "train_top1" in record else ""
        print(f"{label}: loss {record['train_loss']:.4f}{run.objective.describe(record)}  {top1}{val}"
              f"({record['crops_per_s']:,.0f} crops/s; run ETA {run_eta(run, total)})", flush=True)
    elif "val_top1" in record:
        run.last_val = record["val_top1"]
    if log:
        log.write(json.dumps(record) + "\n")
        log.flush()
    if tb:
        for k, v in record.items():
            if isinstance(v, (int, float)):
                tb.add_scalar(k, v, seg.end_epoch)


# ---------------------------------------------------------------------------------------------- a run
def train_run(run) -> dict:
    """Every segment of the plan from the run's position (after ``--resume``), with the output folder claimed;
    returns the run's summary."""
    run.claim_output()
    try:
        return _train_segments(run)
    finally:
        if run.output_lock is not None:
            run.output_lock.release()


def _train_segments(run) -> dict:
    cfg = run.cfg
    if cfg.resume:
        run.resume(cfg.resume)
    t_run = time.perf_counter()
    log = open_log(run) if run.main and _mkdir(cfg.output) else None
    resumed_at = (run.segments[run.position[0]].start_epoch + 1  # the next record's epoch, at the earliest
                  if cfg.resume and run.position[0] < len(run.segments) else None)
    tb = _tensorboard(cfg.output, resumed_at) if run.main else None
    stopped = False
    run.stop = GracefulStop(run.dist.group)
    run.eta = (time.perf_counter(), run.global_step)
    try:
        with run.stop:
            for seg in run.segments[run.position[0]:]:
                stopped = train_segment(run, seg, log, tb)
                if stopped:
                    break
    finally:
        if log:
            log.close()
        if tb:
            tb.close()
        run.close()
        if run.run_bar is not None:
            run.run_bar.close()
    summary = {"arch": cfg.arch, "labels": cfg.labels, "best_top1": run.best_top1,
               "last": run.history[-1] if run.history else None, "seconds": time.perf_counter() - t_run,
               "global_step": run.global_step, "stopped_early": stopped, "output": cfg.output,
               "interrupted": run.stop.name}
    if run.stop.name and run.main:
        last = os.path.join(cfg.output, checkpoint.LAST)
        print(f"stopped by {run.stop.name} after step {run.global_step}: checkpoint {last} saved. To continue, "
              f"rerun the same command with --resume {last}", flush=True)
    run.dist.close()
    return summary


def open_log(run):
    """``log.jsonl`` for appending. On a resume it first holds exactly the checkpoint's records: those a crash
    left after the checkpoint (``checkpoint_epochs`` > 1) are trained again and must not appear twice."""
    path = os.path.join(run.cfg.output, "log.jsonl")
    if run.cfg.resume:  # resume() accepts only our checkpoints, and every one of them carries its history
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in run.history)
        os.replace(path + ".tmp", path)
    return open(path, "a")


# ---------------------------------------------------------------------------------------------- progress
def run_steps(run, rows: int) -> int:
    """Optimizer steps of the whole plan when ``rows`` images are served (for the run's ETA)."""
    per_rank = -(-rows // run.dist.world_size)
    return sum(-(-per_rank // run.images_per_rank(seg.crops)) for seg in run.segments)


def run_eta(run, total: int) -> str:
    t0, step0 = run.eta
    done = run.global_step - step0
    if done < 1:
        return "?"
    return format_eta((total - run.global_step) * (time.perf_counter() - t0) / done)


def segment_bar(run, label: str, steps: int, start: int, total: int):
    """The bar this segment updates: its own (progress_style "epoch"), or the run's single bar ("run")."""
    cfg = run.cfg
    disable = not (run.main and cfg.show_progress)
    if cfg.progress_style == "epoch":
        return progress(total=steps, initial=start, desc=label, unit="step", disable=disable)
    if run.run_bar is None:
        run.run_bar = progress(total=total, initial=run.global_step, desc=cfg.progress_label or cfg.labels,
                               unit="step", disable=disable)
    return run.run_bar


def bar_postfix(run, label: str, loss: float, top1: float | None, rate: float, lr: float, total: int) -> dict:
    if run.cfg.progress_style == "epoch":
        return {"loss": f"{loss:.3f}", **({"top1": f"{top1:.1f}"} if top1 is not None else {}),
                "crops_s": f"{rate:,.0f}", "lr": f"{lr:.2e}", "run_eta": run_eta(run, total)}
    post = {"epoch": label.split()[-1], "loss": f"{loss:.3f}", "crops_s": f"{rate:,.0f}"}
    if run.last_val is not None:
        post["val_top1"] = f"{run.last_val:.1f}"
    return post


def validates_after(run, seg: Segment) -> bool:
    """Validation after this segment: every ``eval_every``-th one and the last."""
    return (seg.index + 1) % run.cfg.eval_every == 0 or seg.index == len(run.segments) - 1


def _mkdir(path: str) -> bool:
    os.makedirs(path, exist_ok=True)
    return True


def _tensorboard(folder: str, purge_step: int | None = None):
    """The TensorBoard writer (None without tensorboard); ``purge_step``: events from this epoch on were written
    after the checkpoint a resume continues (a crash after an unsaved segment) and are dropped."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 - optional (needs tensorboard)
    except Exception:  # noqa: BLE001
        return None
    return SummaryWriter(os.path.join(folder, "tb"), purge_step=purge_step)
