"""``fkd-dali`` command line: one subcommand per job; each one's work lives in its own module."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import labelstore

from .interrupt import exit_code, terminate_like_ctrl_c


def _cmd_inspect(args: argparse.Namespace) -> int:
    from labelstore.locking import store_writer_lock
    store = labelstore.open_store(args.store, mode="r+" if args.clear_rows else "r")
    if args.clear_rows:
        a, _, b = args.clear_rows.partition(":")
        start, stop = int(a), int(b or int(a) + 1)
        with store_writer_lock(args.store):  # not while a generate run writes the store
            store.clear_done(slice(start, stop))
        print(f"rows {start}..{stop - 1} of {args.store} marked not done; rerun generation to relabel them")
    if args.verify or args.sample:
        from .fkd_format import stem_collisions
        from .progress import progress
        total = min(args.sample, len(store.shard_ranges())) if args.sample else len(store.shard_ranges())
        with progress(total=total, desc="verify", unit="shard") as bar:
            v = store.verify(sample=args.sample, workers=args.workers, progress=bar.update)
        what = f"{v['shards']} of {v['shards_total']} shards (random sample)" if args.sample else f"{v['shards']} shards"
        print(f"verified {what}: every chunk decodes, {v['rows_checked']} done rows hold valid labels, all "
              f"{store.num_images:,} file names stay inside the dataset folder")
        clashes = stem_collisions(store.files)
        if clashes:
            print(f"note: {len(clashes)} file name(s) share an FKD label-file name with another (FKD keys images by "
                  "class and name up to the first dot), so `export-fkd` refuses this store: "
                  + "; ".join(f"{a} and {b} -> {stem}.tar" for stem, a, b in clashes[:5]))
    summary = labelstore.summarize(store)
    print(json.dumps(summary, indent=2) if args.json else labelstore.format_summary(summary))
    return 0


def _cmd_import_fkd(args: argparse.Namespace) -> int:
    from .fkd_format import import_fkd
    rep = import_fkd(args.src, args.data, args.save_path, allow_missing=args.allow_missing,
                     workers=args.workers, overwrite=args.overwrite)
    print(f"imported {rep.imported} images ({rep.label_type}, coords {rep.coord_dtype}, largest box "
          f"rounding {rep.max_rounding_px:.4f} px) into {rep.store}"
          + (f"; {len(rep.missing)} images had no label file and are not done" if rep.missing else ""))
    return 0


def _cmd_export_fkd(args: argparse.Namespace) -> int:
    from .fkd_format import export_fkd
    rep = export_fkd(args.store, args.out, fp16=args.fp16, label_type=args.label_type, arrays="numpy" if args.numpy
                     else "torch", overwrite=args.overwrite)
    print(f"wrote {rep.written} FKD label files ({rep.layout} layout) under {args.out}; FKD's trainer reads them with "
          f"--softlabel_path {args.out} --soft_label_type {rep.fkd_label_type}"
          + ("; float16 files need FKD's loss patched (see docs/reliability.md)" if args.fp16 else ""))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from . import bench
    return bench.run(args)


def _cmd_synth(args: argparse.Namespace) -> int:
    from .synthetic import write_dataset
    info = write_dataset(args.out, flavour=args.flavour, classes=args.classes, per_class=args.per_class,
                         val_per_class=args.val_per_class, size=args.size, quality=args.quality,
                         seed=args.seed, workers=args.workers,
                         **({"distractors": args.distractors} if args.distractors is not None else {}))
    print(json.dumps(info, indent=2))
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from .show import show
    r = show(args.store, args.data, args.image, args.out, crop_size=args.crop_size, columns=args.columns,
             max_crops=args.max_crops, device=args.device)
    print(f"{r['file']} (row {r['row']}): {r['crops']} crops -> {r['sheet']} and crop_<k>.png in {args.out}")
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import main as doctor_main
    return doctor_main(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run, run_seeds
    if args.seeds < 1:
        raise ValueError(f"--seeds {args.seeds}: give 1 or more seeds")
    if args.seeds > 1:
        run_seeds(args.workdir, args.seeds, first=args.seed, quick=args.quick, device=args.device)
    else:
        run(args.workdir, quick=args.quick, device=args.device, seed=args.seed)
    return 0


FKD_LABEL_TYPE_TOP_K = {"hard": 1, "smoothing": 1, "marginal_smoothing_k5": 5, "marginal_renorm": 5,
                        "marginal_renorm_k5": 5, "marginal_smoothing_k10": 10}


def _pair(text: str, name: str) -> tuple[float, float]:
    parts = [_fraction(x) for x in text.split(",")]
    if len(parts) != 2 or parts[0] > parts[1]:
        raise ValueError(f"{name} takes two increasing values 'min,max', got {text!r}")
    return parts[0], parts[1]


def _fraction(x: str) -> float:
    """'3/4' or '0.75' -> 0.75."""
    a, _, b = x.strip().partition("/")
    return float(a) / float(b) if b else float(a)


def _cmd_generate(args: argparse.Namespace) -> int:
    from .generate import GenerateConfig, generate
    from .teachers import parse_teachers
    if not args.save_path and not args.evaluate:
        raise ValueError("--save-path STORE is required (the label store to write or resume)")
    top_k = args.top_k
    if top_k is None:
        top_k = FKD_LABEL_TYPE_TOP_K.get(args.label_type, 5) if args.label_type else 5
    cfg = GenerateConfig(
        data=args.data, save_path=args.save_path,
        teachers=parse_teachers(args.arch, args.teacher_path, args.weights, args.input_size, args.interpolation,
                                args.mean, args.std),
        num_crops=args.num_crops, top_k=top_k, temperature=args.temperature,
        scale=(args.min_scale_crops, args.max_scale_crops), ratio=_pair(args.ratio, "--ratio"), seed=args.seed,
        group_size=args.num_seg, batch_size=args.batch_size, device=args.device, num_classes=args.num_classes,
        skip_corrupt=args.skip_corrupt, reference=args.reference, rows_per_shard=args.rows_per_shard,
        crops_per_chunk=args.crops_per_chunk, threads=args.workers, amp=False if args.no_amp else None,
        channels_last=False if args.no_channels_last else None, label_type=args.label_type, rank=args.rank,
        world_size=args.world_size, show_progress=not args.quiet, evaluate=args.evaluate,
        crop_dtype=args.crop_dtype, **_placement(args))
    rep = generate(cfg)
    if args.evaluate:
        return 0
    tag = f"rank {rep.rank}/{rep.world_size}: " if rep.world_size > 1 else ""
    if rep.shards:
        print(f"{tag}labelled {rep.images:,} images, {rep.crops:,} crops in {rep.seconds:.1f} s "
              f"({rep.crops_per_s:,.0f} crops/s) in {rep.shards} shard(s) -> {rep.store}")
    else:
        print(f"{tag}nothing to label: every shard {'of this rank ' if tag else ''}in {rep.store} was already done")
    if rep.skipped:
        print(f"{tag}left out {len(rep.skipped)} unreadable image(s) (--skip-corrupt; recorded in the store, never "
              "trained on): " + "; ".join(why for _, why in rep.skipped[:5]) + (" ..." if len(rep.skipped) > 5 else ""))
    print(f"{tag}store {'complete' if rep.complete else 'not complete yet (other ranks, or rerun to resume)'}")
    return 0


def train_config(args: argparse.Namespace):
    """The TrainConfig of a parsed ``train`` command line (imports torch)."""
    from .models import is_transformer
    from .train import recipe_config
    if args.multiprocessing_distributed or (args.world_size and args.world_size > 1):
        raise ValueError("launch multi-GPU training with torchrun: torchrun --nproc_per_node N train.py ... "
                         "(--multiprocessing-distributed/--world-size/--dist-url are FKD's mp.spawn flags)")
    if args.pretrained:
        raise ValueError("--pretrained takes a weights name here: --pretrained-weights NAME (torchvision's, e.g. "
                         "IMAGENET1K_V1, from the local hub cache), or --init-from CHECKPOINT")
    mixing = _mixing(args)
    cos = True if args.cos or args.sched == "cosine" else False if args.sched == "step" else \
        (None if args.recipe != "fkd" else is_transformer(args.arch))  # FKD: cosine for ViTs, steps for CNNs
    return recipe_config(
        args.recipe, init_from=args.init_from, pretrained_weights=args.pretrained_weights,
        use_discriminator_loss=args.use_discriminator_loss, d_lr=args.d_lr,
        data=args.data, arch=args.arch, labels=args.labels, softlabel_path=args.softlabel_path,
        soft_label_type=args.soft_label_type, temperature=args.temp, num_crops=args.num_crops,
        batch_size=args.batch_size, epochs=args.epochs, input_size=args.input_size, opt=args.opt, lr=args.lr,
        momentum=args.momentum, weight_decay=args.weight_decay, cos=cos,
        schedule=tuple(args.schedule) if args.schedule is not None else None, warmup_epochs=args.warmup_epochs,
        warmup_lr=args.warmup_lr, min_lr=args.min_lr, opt_eps=args.opt_eps, drop_path=args.drop_path,
        clip_grad=args.clip_grad, **mixing, label_smoothing=args.label_smoothing, scale=_pair(args.scale, "--scale"), teacher_arch=args.teacher_arch, teacher_path=args.teacher_path,
        teacher_weights=args.teacher_weights, teacher_input_size=args.teacher_input_size,
        model_ema=args.model_ema, model_ema_decay=args.model_ema_decay, amp=args.amp,
        channels_last=args.channels_last, device=args.device, output=args.output, resume=args.resume or None,
        evaluate=args.evaluate, seed=args.seed if args.seed is not None else 0, workers=args.workers,
        num_classes=args.num_classes, allow_incomplete=args.allow_incomplete,
        checkpoint_every=args.checkpoint_every, checkpoint_epochs=args.checkpoint_epochs,
        max_steps=args.max_steps, val_batch_size=args.val_batch_size,
        show_progress=not args.quiet, dist_timeout=args.dist_timeout, dist_backend=args.dist_backend,
        overwrite=args.overwrite, **_placement(args))


def prepare_train(args: argparse.Namespace):
    """The TrainConfig and the dataset scan of a parsed ``train`` command line, the scan started first."""
    from .dataset import DatasetError, start_train_scan
    # The dataset scan (a child process on a large dataset) runs while torch, DALI and the model zoo import.
    try:
        scan = start_train_scan(args.data, args.labels, args.evaluate)
    except DatasetError:
        scan = None  # the Trainer names the problem, after the options were checked
    try:
        cfg = train_config(args)
    except BaseException:
        if scan is not None:
            scan.cancel()
        raise
    return cfg, scan


def _cmd_train(args: argparse.Namespace) -> int:
    cfg, scan = prepare_train(args)
    from .train import train
    result = train(cfg, scan)
    if not args.evaluate and "best_top1" in result:
        if result.get("interrupted"):
            return exit_code(signal.Signals[result["interrupted"]])
        last = result["last"]
        val = (f"best val top-1 {result['best_top1']:.2f}%, last {last['val_top1']:.2f}%" if last else
               "not validated yet (validation runs at the end of each segment)")
        print(f"done: {result['arch']} ({result['labels']} labels), {val}, {result['global_step']} steps in "
              f"{result['seconds']:.0f} s; checkpoints in {result['output']}"
              + (" (stopped by --max-steps)" if result["stopped_early"] else ""))
    return 0


def _mixing(args: argparse.Namespace) -> dict:
    """TrainConfig's mixing fields: FKD's --mixup-cutmix, or MEAL V2's --w-cutmix (CutMix alone)."""
    if args.w_cutmix and args.mixup_cutmix:
        raise ValueError("give either --mixup-cutmix (FKD's Mixup/CutMix) or --w-cutmix (MEAL V2's CutMix), not both")
    if args.w_cutmix:
        return dict(mixup_cutmix=True, mixup=0.0, cutmix=args.beta, mixup_cutmix_prob=args.cutmix_prob)
    return dict(mixup_cutmix=args.mixup_cutmix, mixup=args.mixup, cutmix=args.cutmix,
                mixup_cutmix_prob=args.mixup_cutmix_prob, mixup_switch_prob=args.mixup_switch_prob)


def add_placement_args(p: argparse.ArgumentParser) -> None:
    """Where a rank runs: its GPU, its CPU cores, and how its GPU decoder uses the hardware."""
    p.add_argument("--device-id", type=int, help="CUDA device of this process (default: its local rank, i.e. "
                   "LOCAL_RANK under torchrun, --rank modulo the visible GPUs otherwise)")
    p.add_argument("--cpu-affinity", choices=("auto", "none"), default="auto",
                   help="auto (default): with several ranks on a node, pin each to its share of the cores near its "
                        "GPU (DALI's threads too); none: leave scheduling to the OS or the launcher")
    p.add_argument("--hw-decoder-load", type=float, default=0.65,
                   help="share of JPEGs sent to the GPU's hardware decoder (A100/H100/H200; DALI's default 0.65)")
    p.add_argument("--decoder-padding-mib", default="16,8", metavar="DEVICE,HOST",
                   help="nvJPEG buffer padding per decoder thread in MiB, device and pinned host (DALI's 16,8); "
                        "lower it when many pipelines or ranks share one GPU")


def _placement(args: argparse.Namespace) -> dict:
    """GenerateConfig / TrainConfig fields of :func:`add_placement_args`."""
    from pipelines import DecoderOptions
    try:
        dev, host = (int(x) for x in args.decoder_padding_mib.split(","))
    except ValueError:
        raise ValueError(f"--decoder-padding-mib takes two integers 'DEVICE,HOST' (MiB), got "
                         f"{args.decoder_padding_mib!r}") from None
    return {"device_id": args.device_id, "cpu_affinity": args.cpu_affinity,
            "decoder": DecoderOptions(hw_decoder_load=args.hw_decoder_load, device_memory_padding=dev << 20,
                                      host_memory_padding=host << 20)}


def _bool_flag(p: argparse.ArgumentParser, name: str, help: str) -> None:
    p.add_argument(f"--{name}", dest=name.replace("-", "_"), action=argparse.BooleanOptionalAction, default=None,
                   help=help)


def add_train_args(t: argparse.ArgumentParser) -> None:
    t.add_argument("data", metavar="DATA", help="dataset root holding train/ and val/")
    t.add_argument("-a", "--arch", "--model", dest="arch", default="resnet50",
                   help="student: a torchvision model, deit_tiny, deit_small, SReT_T, SReT_LT, SReT_S")
    t.add_argument("--softlabel-path", "--softlabel_path", dest="softlabel_path", help="the label store")
    t.add_argument("--labels", choices=("fkd", "hard", "online"), default="fkd",
                   help="fkd: stored soft labels (default); hard: standard crops + ground truth; online: vanilla KD")
    t.add_argument("--soft-label-type", "--soft_label_type", dest="soft_label_type", default="marginal_smoothing_k5",
                   help="hard, smoothing, marginal_smoothing_kK, marginal_renorm(_kK), full (FKD's names accepted)")
    t.add_argument("--temp", type=float, default=1.0, help="temperature on the student's logits")
    t.add_argument("--recipe", choices=("fkd", "meal-v2"), default="fkd",
                   help="defaults of every option not given: fkd (FKD's, default) or meal-v2 (MEAL V2's FKD_train.py: "
                        "8 crops, -b 512, 200 epochs, lr 0.01 x0.1 at 100 and 180, no weight decay, the "
                        "discriminator on; needs --init-from or --pretrained-weights)")
    t.add_argument("--init-from", "--student-state-file", dest="init_from", metavar="CHECKPOINT",
                   help="start the student from these weights (ours, FKD's, MEAL V2's or a torchvision state_dict; "
                        "same architecture and classes)")
    t.add_argument("--pretrained-weights", dest="pretrained_weights", metavar="NAME",
                   help="start the student from torchvision's weights NAME (e.g. IMAGENET1K_V1) in the local hub "
                        "cache; their classes must be the run's")
    t.add_argument("--use-discriminator-loss", dest="use_discriminator_loss", action="store_true", default=None,
                   help="MEAL V2's discriminator on the student's softmax vs the stored soft labels (meal-v2: on)")
    t.add_argument("--no-discriminator-loss", dest="use_discriminator_loss", action="store_false",
                   help="turn the discriminator of --recipe meal-v2 off")
    t.add_argument("--d-lr", "--d_lr", dest="d_lr", type=float, help="the discriminator's learning rate (1e-4)")
    t.add_argument("--w-cutmix", dest="w_cutmix", action="store_true",
                   help="MEAL V2's CutMix (one box per batch; its loss weighs both images' labels by area)")
    t.add_argument("--beta", type=float, default=1.0, help="--w-cutmix: lam ~ Beta(beta, beta)")
    t.add_argument("--cutmix-prob", dest="cutmix_prob", type=float, default=1.0, help="--w-cutmix: probability")
    t.add_argument("--num-crops", "--num_crops", dest="num_crops", type=int,
                   help="crops per image per step (one pass = this many epochs; fkd 4, meal-v2 8)")
    t.add_argument("-b", "--batch-size", dest="batch_size", type=int,
                   help="crops per optimizer step over all ranks (images per step = ceil(b / num_crops); fkd 1024, "
                        "meal-v2 512)")
    t.add_argument("--epochs", type=int, help="fkd 300, meal-v2 200")
    t.add_argument("--input-size", "--image-size", dest="input_size", type=int, default=224)
    t.add_argument("--opt", choices=("sgd", "adamw"), help="default: adamw for ViT/DeiT/SReT, sgd otherwise")
    t.add_argument("--lr", "--learning-rate", dest="lr", type=float, help="default: 0.1 (sgd) / 0.002 (adamw)")
    t.add_argument("--momentum", type=float, help="SGD momentum (0.9)")
    t.add_argument("--wd", "--weight-decay", dest="weight_decay", type=float, help="default: 1e-4 (sgd) / 0.05 (adamw); meal-v2 0")
    t.add_argument("--cos", action="store_true", help="cosine schedule (FKD's flag; the ViT recipe's default)")
    t.add_argument("--sched", choices=("cosine", "step"), help="cosine, or step at --schedule milestones")
    t.add_argument("--schedule", type=int, nargs="*",
                   help="step milestones (x0.1) without --cos (fkd 120 240, meal-v2 100 180)")
    t.add_argument("--warmup-epochs", dest="warmup_epochs", type=int, help="default: 5 for ViTs (single-crop), 0 else")
    t.add_argument("--warmup-lr", dest="warmup_lr", type=float, default=1e-5)
    t.add_argument("--min-lr", dest="min_lr", type=float)
    t.add_argument("--opt-eps", dest="opt_eps", type=float, default=1e-8)
    t.add_argument("--drop-path", dest="drop_path", type=float, help="stochastic depth (SReT's own default otherwise)")
    t.add_argument("--clip-grad", dest="clip_grad", type=float)
    t.add_argument("--mixup-cutmix", "--mixup_cutmix", dest="mixup_cutmix", action="store_true",
                   help="Mixup/CutMix on images and soft labels")
    t.add_argument("--mixup", type=float, default=0.8)
    t.add_argument("--cutmix", type=float, default=1.0)
    t.add_argument("--mixup-cutmix-prob", "--mixup_cutmix_prob", dest="mixup_cutmix_prob", type=float, default=1.0)
    t.add_argument("--mixup-switch-prob", "--mixup_switch_prob", dest="mixup_switch_prob", type=float, default=0.5)
    t.add_argument("--label-smoothing", dest="label_smoothing", type=float, default=0.0, help="--labels hard only")
    t.add_argument("--scale", default="0.08,1", help="crop area range of --labels hard/online (FKD: stored crops)")
    t.add_argument("--teacher-arch", dest="teacher_arch", help="--labels online: the teacher")
    t.add_argument("--teacher-path", dest="teacher_path")
    t.add_argument("--teacher-weights", dest="teacher_weights")
    t.add_argument("--teacher-input-size", dest="teacher_input_size", type=int)
    t.add_argument("--model-ema", dest="model_ema", action="store_true", help="keep an EMA of the weights")
    t.add_argument("--model-ema-decay", dest="model_ema_decay", type=float, default=0.9998)
    _bool_flag(t, "amp", "bf16 autocast (default: on with a GPU)")
    _bool_flag(t, "channels-last", "channels-last memory format (default: on with a GPU)")
    t.add_argument("--device", choices=("cpu", "gpu"))
    t.add_argument("--output", "--save_checkpoint_path", "--save", dest="output",
                   help="checkpoints and log.jsonl (default runs/ARCH-LABELS); a folder holding another run's "
                        "checkpoint is refused unless --resume continues it or --overwrite replaces it")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the checkpoints and log of another run in --output (they are deleted)")
    t.add_argument("--resume", default="", help="continue from this checkpoint (or evaluate it with -e)")
    t.add_argument("-e", "--evaluate", action="store_true", help="evaluate --resume on DATA/val and exit")
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("-j", "--workers", type=int, help="DALI threads per rank")
    t.add_argument("--num-classes", "--num_classes", dest="num_classes", type=int)
    t.add_argument("--allow-incomplete", action="store_true", help="train on the done rows of an incomplete store")
    t.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N steps")
    t.add_argument("--checkpoint-epochs", type=int, default=1,
                   help="write the checkpoint at a segment end only once N epochs passed since the last one "
                        "(default 1: every segment; the last segment, a stop signal and a new best model always "
                        "save). For short epochs, where writing it costs a noticeable share of the time")
    t.add_argument("--max-steps", type=int, help="stop after this many steps (with a checkpoint); at least 1")
    t.add_argument("--val-batch-size", type=int, default=64)
    t.add_argument("--dist-timeout", type=float, default=600.0,
                   help="seconds a DDP collective waits for a lost rank before the job fails (default 600)")
    t.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    add_placement_args(t)
    # Accepted for FKD compatibility.
    t.add_argument("-p", "--print-freq", type=int, default=10, help=argparse.SUPPRESS)
    t.add_argument("--start-epoch", type=int, default=0, help=argparse.SUPPRESS)
    t.add_argument("--gpu", type=int, help=argparse.SUPPRESS)
    t.add_argument("--pretrained", action="store_true", help=argparse.SUPPRESS)
    t.add_argument("--world-size", dest="world_size", type=int, help=argparse.SUPPRESS)
    t.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    t.add_argument("--dist-url", help=argparse.SUPPRESS)
    t.add_argument("--dist-backend", choices=("nccl", "gloo"),
                   help="DDP backend (default: nccl when every rank has its own GPU, gloo on the CPU or when ranks "
                        "share a GPU)")
    t.add_argument("--multiprocessing-distributed", action="store_true", help=argparse.SUPPRESS)


def add_generate_args(g: argparse.ArgumentParser) -> None:
    g.add_argument("data", metavar="DATA", help="dataset root holding train/ and val/")
    g.add_argument("--save-path", "--save_path", dest="save_path", help="the label store to write (or resume)")
    g.add_argument("-a", "--arch", required=True,
                   help="teacher(s), comma-separated: a torchvision model name, 'torchscript' or 'export' with "
                        "--teacher-path, or a timm name when timm is installed")
    g.add_argument("--weights", help="torchvision weights name (e.g. IMAGENET1K_V2, DEFAULT), from the local hub cache")
    g.add_argument("--teacher-path", "--teacher_path", dest="teacher_path",
                   help="checkpoint or serialized model per teacher (comma-separated)")
    g.add_argument("--input-size", "--input_size", dest="input_size", default="224",
                   help="teacher input size (one, or one per teacher)")
    g.add_argument("--interpolation", default="bicubic", help="crop resampling per teacher: bicubic (FKD), bilinear")
    g.add_argument("--mean", help="per-teacher normalisation mean, e.g. 0.5/0.5/0.5 (default ImageNet's)")
    g.add_argument("--std", help="per-teacher normalisation std, e.g. 0.5/0.5/0.5 (default ImageNet's)")
    g.add_argument("--num-crops", "--num_crops", dest="num_crops", type=int, default=500, help="crops per image (C)")
    g.add_argument("--num-seg", "--num_seg", dest="num_seg", type=int, default=50,
                   help="crops cut from one decode (a group); the teacher batch is -b x --num-seg crops")
    g.add_argument("-b", "--batch-size", dest="batch_size", type=int, default=4, help="groups per pipeline batch")
    g.add_argument("--top-k", dest="top_k", type=int, help="probabilities kept per crop (default 5; num_classes = full)")
    g.add_argument("--label-type", "--label_type", dest="label_type",
                   help="FKD's label type; sets --top-k (marginal_smoothing_k5: 5, k10: 10, hard/smoothing: 1) and "
                        "is recorded as the intended training label type")
    g.add_argument("--temp", "--temperature", dest="temperature", type=float, default=1.0,
                   help="softmax temperature of the stored probabilities")
    g.add_argument("--min-scale-crops", "--min_scale_crops", dest="min_scale_crops", type=float, default=0.08)
    g.add_argument("--max-scale-crops", "--max_scale_crops", dest="max_scale_crops", type=float, default=0.936)
    g.add_argument("--ratio", default="3/4,4/3", help="aspect-ratio range of the crops")
    g.add_argument("--seed", type=int, default=0, help="crops of row r depend only on (seed, r)")
    g.add_argument("--use-fp16", "--use_fp16", dest="use_fp16", action="store_true",
                   help="accepted for FKD compatibility: probabilities are always stored as float16")
    g.add_argument("--reference", "--reference-path", "--reference_path", dest="reference",
                   help="reuse the boxes and flips of this store (a new store is written; see docs)")
    g.add_argument("--device", choices=("cpu", "gpu"), help="default: the GPU when there is one")
    g.add_argument("--num-classes", dest="num_classes", type=int,
                   help="store the teacher's class count when it differs from the dataset's (deliberately)")
    g.add_argument("--skip-corrupt", action="store_true",
                   help="leave unreadable images out (recorded in the store, never trained on) instead of stopping")
    g.add_argument("--rows-per-shard", type=int, help="images per shard file (default: about 2^20 crops per shard)")
    g.add_argument("--crops-per-chunk", type=int, help="crops per inner chunk (default 4)")
    g.add_argument("-j", "--workers", type=int, help="DALI CPU threads (default: the cores of this rank)")
    g.add_argument("--rank", type=int, help="this process's rank, for launches without torchrun")
    g.add_argument("--world-size", type=int, help="number of processes, for launches without torchrun")
    g.add_argument("-e", "--evaluate", action="store_true", help="only evaluate the teacher(s) on DATA/val")
    g.add_argument("--crop-dtype", choices=("float32", "float16"), default="float32",
                   help="dtype of the teacher's input crops out of DALI (float16 halves the bandwidth)")
    g.add_argument("--no-amp", action="store_true", help="run the teachers in float32 on the GPU (default bf16)")
    g.add_argument("--no-channels-last", action="store_true", help="keep NCHW on the GPU")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_placement_args(g)


class _Parser(argparse.ArgumentParser):
    """No abbreviated options (``--num-crop`` is not silently ``--num-crops``), in every subcommand."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fkd-dali", description=(
        "Fast Knowledge Distillation on NVIDIA DALI: label every image's random crops with a teacher once "
        "(generate), then train students that replay those exact crops on the GPU (train)."))
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="label a dataset's crops with one or several teachers",
                       description="Label every training image's RandomResizedCrop crops with one or several "
                       "teachers into a label store. Rerun the same command to resume; launch with torchrun (or "
                       "--rank/--world-size) to shard the work. FKD's option spellings are accepted.")
    add_generate_args(g)
    g.set_defaults(func=_cmd_generate)

    t = sub.add_parser("train", help="train a student from a label store (or a hard-label / online-KD baseline)",
                       description="FKD training: replay the stored crops with their soft labels (DALI), DDP via "
                       "torchrun, exact resume. FKD's train_FKD.py / train_ViT_FKD.py flags are accepted.")
    add_train_args(t)
    t.set_defaults(func=_cmd_train)

    i = sub.add_parser("inspect", help="summarise a label store (shape, chunking, bytes per crop, teachers)")
    i.add_argument("store", metavar="STORE", help="the label store folder")
    i.add_argument("--json", action="store_true", help="print the summary as JSON")
    i.add_argument("--verify", action="store_true",
                   help="decode every chunk and check every label (in parallel over shards, with progress)")
    i.add_argument("--sample", type=int, metavar="K", help="verify K random shards only (a quick check)")
    i.add_argument("-j", "--workers", type=int, help="processes for --verify (default: the cores)")
    i.add_argument("--clear-rows", metavar="A:B", help="mark rows A..B-1 not done so generation relabels them")
    i.set_defaults(func=_cmd_inspect)

    im = sub.add_parser("import-fkd", help="convert FKD's per-image soft-label files into a label store")
    im.add_argument("src", metavar="SRC", help="FKD label folder (SRC/<class>/<stem>.tar, or one level above)")
    im.add_argument("--data", required=True, help="dataset root holding train/")
    im.add_argument("--save-path", "--save_path", dest="save_path", required=True, help="store to create")
    im.add_argument("--allow-missing", action="store_true",
                    help="import what exists; images without a label file stay not done")
    im.add_argument("-j", "--workers", type=int, default=0, help="processes reading label files")
    im.add_argument("--overwrite", action="store_true", help="replace an existing store at --save-path")
    im.set_defaults(func=_cmd_import_fkd)

    ex = sub.add_parser("export-fkd", help="write a label store as FKD's per-image soft-label files")
    ex.add_argument("store", metavar="STORE", help="the label store to export")
    ex.add_argument("--out", required=True, help="output folder (written as OUT/<split>/<class>/<stem>.tar)")
    ex.add_argument("--label-type", dest="label_type", choices=("auto", "hard", "smoothing", "marginal"),
                    default="auto", help="FKD's layout of the labels: hard (C,) class ids, smoothing (C, 2), marginal "
                    "(C, 2, k); auto: the store's recorded label type (hard for --label-type hard stores)")
    ex.add_argument("--fp16", action="store_true",
                    help="float16 coords and probabilities, as FKD's --use_fp16 (FKD's trainer cannot read them "
                         "unpatched: see docs/reliability.md)")
    ex.add_argument("--numpy", action="store_true",
                    help="numpy arrays, as FKD's generator writes them (torch >= 2.6 then needs weights_only=False "
                         "to load them); default: torch tensors, which any torch loads safely")
    ex.add_argument("--overwrite", action="store_true", help="replace label files already in OUT")
    ex.set_defaults(func=_cmd_export_fkd)

    s = sub.add_parser("synth", help="write a synthetic ImageFolder dataset of real JPEGs")
    s.add_argument("--out", required=True, help="dataset root to write (OUT/train/<class>/, OUT/val/<class>/)")
    s.add_argument("--flavour", choices=("objects", "photo"), default="objects",
                   help="objects: a class object on clutter with distractors, where per-crop soft labels matter "
                        "(the demo's); photo: ImageNet-like size and JPEG quality, for throughput work")
    s.add_argument("--classes", type=int, default=10, help="number of classes")
    s.add_argument("--per-class", type=int, default=50, help="training images per class")
    s.add_argument("--val-per-class", type=int, default=10, help="validation images per class")
    s.add_argument("--size", type=int, default=0,
                   help="side in px (objects: default 128; photo: default an ImageNet-like 250..500 mix)")
    s.add_argument("--quality", type=int, default=90, help="JPEG quality (1-95)")
    s.add_argument("--distractors", type=int,
                   help="objects: at most this many smaller objects of other classes per image (default 5, the "
                        "demo's)")
    s.add_argument("--seed", type=int, default=0, help="the same seed writes the same files")
    s.add_argument("-j", "--workers", type=int, default=0, help="processes writing images (0: this one)")
    s.set_defaults(func=_cmd_synth)

    sh = sub.add_parser("show", help="an image's stored crops as the loader replays them, with their labels")
    sh.add_argument("store", metavar="STORE", help="the label store")
    sh.add_argument("data", metavar="DATA", help="dataset root holding train/")
    sh.add_argument("--image", required=True, help="store row number, or the file's path relative to train/")
    sh.add_argument("--out", required=True, help="folder for sheet.png and crop_<k>.png")
    sh.add_argument("--crop-size", type=int, default=224, help="side of each crop in px, as the loader's --input-size")
    sh.add_argument("--columns", type=int, default=8, help="crops per row of the contact sheet")
    sh.add_argument("--max-crops", type=int, default=64, help="crops on the sheet (every crop gets its PNG)")
    sh.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                    help="decode and cut the crops on the CPU (default) or the GPU, as a GPU training run sees them")
    sh.set_defaults(func=_cmd_show)

    d = sub.add_parser("demo", help="the end-to-end flow on generated data (what `make demo` runs)")
    d.add_argument("--workdir", default="demo-out", help="folder for the demo's data, stores, runs and report")
    d.add_argument("--quick", action="store_true", help="fewer images and epochs (for tests)")
    d.add_argument("--device", choices=("cpu", "gpu"), help="default: the GPU when there is one")
    d.add_argument("--seed", type=int, default=0, help="draws the data, the teacher and the students (default 0)")
    d.add_argument("--seeds", type=int, default=1,
                   help="run the demo for N seeds (--seed, --seed+1, ...; each in WORKDIR/seed-S) and print the "
                        "spread of the accuracies (docs/benchmarks.md's table)")
    d.set_defaults(func=_cmd_demo)

    from .bench import add_parser as add_bench_parser
    add_bench_parser(sub, _cmd_bench)
    from .doctor import add_parser as add_doctor_parser
    add_doctor_parser(sub, _cmd_doctor)
    return p


def _resume_hint(args: argparse.Namespace) -> str:
    """What to do after a command was stopped at once."""
    if args.command == "generate":
        return "finished shards are kept: rerun the same command to resume (nothing is labelled twice)"
    if args.command == "train" and not args.evaluate:
        last = os.path.join(args.output or os.path.join("runs", f"{args.arch}-{args.labels}"), "checkpoint.pth.tar")
        return (f"rerun the same command with --resume {last} to continue from the last checkpoint (at the end of "
                "the last segment, or of --checkpoint-every steps)")
    if args.command == "import-fkd":
        return "no store was left behind: rerun the same command"
    return ""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with terminate_like_ctrl_c():
            return int(args.func(args) or 0)
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        hint = _resume_hint(args)
        print(f"fkd-dali {args.command}: stopped by {signal.Signals(signum).name}" + (f"; {hint}" if hint else ""),
              file=sys.stderr)
        return exit_code(signum)
    except BrokenPipeError:  # e.g. `fkd-dali inspect STORE | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (labelstore.StoreError, FileNotFoundError, ValueError) as e:
        print(f"fkd-dali {args.command}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # permissions, a file where a folder belongs, a full disk ...
        where = f"{e.filename}: " if e.filename else ""
        print(f"fkd-dali {args.command}: error: {where}{e.strerror or e}. Check that path and its permissions "
              "(a read-only folder or store cannot be written)", file=sys.stderr)
        return 1
    except Exception as e:  # errors of our own modules carry their fix in the message
        if type(e).__module__.startswith(("fkd_dali", "pipelines", "labelstore")):
            print(f"fkd-dali {args.command}: error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
