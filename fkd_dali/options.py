"""The command line's options, below the commands that use them: the argument definitions of ``train`` and
``generate`` and their translation into a TrainConfig / GenerateConfig. ``fkd_dali.cli`` builds its parser
from these, and so do the benchmarks that run ``train``'s own path (``bench scale``); nothing here imports
torch before the dataset scan has started (:func:`prepare_train`)."""

from __future__ import annotations

import argparse
import math

from labelstore.bounds import MAX_CROPS

from . import objectives


class Parser(argparse.ArgumentParser):
    """No abbreviated options (``--num-crop`` is not silently ``--num-crops``), in every subcommand."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


# ---------------------------------------------------------------------------------------------- option types
# argparse ``type=`` functions: a value that cannot be right is refused while the command line is parsed, before
# any work, naming the option (argparse adds it), the value and the valid range.
def int_range(low: int, high: int | None = None):
    """An integer in ``low..high`` (no upper bound when ``high`` is None)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is out of range: give an integer "
                                             + (f"from {low:,} to {high:,}" if high is not None else f">= {low:,}"))
        return value
    return parse


def real(low: float, high: float | None = None, *, above: bool = False):
    """A finite number >= ``low`` (> ``low`` when ``above``) and <= ``high``: nan and inf are refused."""
    want = f"a finite number {'>' if above else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number: give {want}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number: give {want}")
        if value < low or (above and value == low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text} is out of range: give {want}")
        return value
    return parse


POSITIVE = int_range(1)
NON_NEGATIVE = int_range(0)
TEMPERATURE = real(0.0, above=True)  # softmax(logits / T): T = 0 divides by zero, inf makes every label uniform
RATE = real(0.0)  # learning rates and weight decay: nan or inf ruin every weight at the first step
CROPS = int_range(1, MAX_CROPS)  # crops per image: what a label store may hold
SCALE = real(0.0, 1.0, above=True)  # a crop's share of its image's area


def train_parser() -> argparse.ArgumentParser:
    """A parser of ``train``'s options alone (``fkd-dali train``'s, without the command name)."""
    p = Parser(prog="fkd-dali train")
    add_train_args(p)
    return p


FKD_LABEL_TYPE_TOP_K = {"hard": 1, "smoothing": 1, "marginal_smoothing_k5": 5, "marginal_renorm": 5,
                        "marginal_renorm_k5": 5, "marginal_smoothing_k10": 10}


def pair(text: str, name: str) -> tuple[float, float]:
    parts = [fraction(x) for x in text.split(",")]
    if len(parts) != 2 or parts[0] > parts[1]:
        raise ValueError(f"{name} takes two increasing values 'min,max', got {text!r}")
    return parts[0], parts[1]


def fraction(x: str) -> float:
    """'3/4' or '0.75' -> 0.75."""
    a, _, b = x.strip().partition("/")
    return float(a) / float(b) if b else float(a)


# --views: the view recipes of self-supervised stores, as entries replacing MoCo v2's (fkd_dali.views.view_recipe)
VIEW_PRESETS = {"moco-v2": {}, "s2-bnn": {"jitter_p": 0.6, "blur_p": 0.2}}

# generate's options that only classifier teachers' top-k soft labels use (refused with --ssl-teacher)
TOPK_ONLY = (("--top-k", "top_k"), ("--label-type", "label_type"), ("--temp", "temperature"),
             ("--weights", "weights"), ("--teacher-path", "teacher_path"), ("--num-classes", "num_classes"),
             ("--reference", "reference"), ("--evaluate", "evaluate"))


def generate_config(args: argparse.Namespace):
    """The GenerateConfig of a parsed ``generate`` command line (imports torch)."""
    from .generate import GenerateConfig
    from .teachers import parse_teachers
    if args.ssl_teacher:
        return ssl_generate_config(args)
    if not args.arch:
        raise ValueError("give the teacher: -a ARCH (classifier teachers: top-k soft labels) or --ssl-teacher CKPT "
                         "(a self-supervised teacher: embeddings)")
    for flag, dest in (("--ssl-head", "ssl_head"), ("--views", "views")):
        if getattr(args, dest) is not None:
            raise ValueError(f"{flag} applies to --ssl-teacher; classifier teachers (-a) crop without photometric "
                             f"views: drop {flag}")
    top_k = args.top_k
    if top_k is None:
        top_k = FKD_LABEL_TYPE_TOP_K.get(args.label_type, 5) if args.label_type else 5
    cfg = GenerateConfig(
        data=args.data, save_path=args.save_path,
        teachers=parse_teachers(args.arch, args.teacher_path, args.weights, args.input_size,
                                args.interpolation or "bicubic", args.mean, args.std),
        num_crops=args.num_crops, top_k=top_k, temperature=1.0 if args.temperature is None else args.temperature,
        scale=(args.min_scale_crops, args.max_scale_crops), ratio=pair(args.ratio, "--ratio"), seed=args.seed,
        group_size=args.num_seg, batch_size=args.batch_size, device=args.device, num_classes=args.num_classes,
        skip_corrupt=args.skip_corrupt, reference=args.reference, rows_per_shard=args.rows_per_shard,
        crops_per_chunk=args.crops_per_chunk, threads=args.workers, amp=False if args.no_amp else None,
        channels_last=False if args.no_channels_last else None, label_type=args.label_type, rank=args.rank,
        world_size=args.world_size, show_progress=not args.quiet, evaluate=args.evaluate,
        crop_dtype=args.crop_dtype, **placement(args))
    return cfg


def ssl_generate_config(args: argparse.Namespace):
    """The GenerateConfig of ``generate --ssl-teacher``: the teacher loaded (on the CPU) by
    :mod:`fkd_dali.ssl_teachers`, an embedding store of its outputs on the views of ``--views``."""
    from .generate import EmbeddingTeacher, GenerateConfig
    from .ssl_teachers import load_embedding_teacher, parse_embedding_teachers
    from .teachers import TeacherError
    given = [flag for flag, dest in TOPK_ONLY if getattr(args, dest) not in (None, False)]
    if args.arch:
        given.insert(0, "-a")
    if given:
        raise ValueError(f"{', '.join(given)}: not used with --ssl-teacher (an embedding store holds the teacher's "
                         "embedding of each view, not top-k probabilities of classifier teachers); drop "
                         f"{'it' if len(given) == 1 else 'them'}")
    sizes = [int(x) for x in args.input_size.split(",")]
    if len(set(sizes)) > 1:
        raise TeacherError(f"--input-size {args.input_size}: the teachers of an ensemble see one view; give one size")

    def triple(text, name):
        if text is None:
            return None
        vals = [float(x) for x in text.split("/")]
        if len(vals) != 3:
            raise TeacherError(f"{name} {text}: give three values, e.g. 0.485/0.456/0.406")
        return vals
    specs = parse_embedding_teachers(args.ssl_teacher, args.ssl_head, sizes[0], args.interpolation,
                                     triple(args.mean, "--mean"), triple(args.std, "--std"))
    teacher = EmbeddingTeacher.of(load_embedding_teacher(specs if len(specs) > 1 else specs[0]))
    return GenerateConfig(
        data=args.data, save_path=args.save_path, teachers=[], embedding_teacher=teacher,
        views=VIEW_PRESETS[args.views or "moco-v2"] or None, num_crops=args.num_crops, seed=args.seed,
        group_size=args.num_seg, batch_size=args.batch_size, device=args.device, skip_corrupt=args.skip_corrupt,
        rows_per_shard=args.rows_per_shard, crops_per_chunk=args.crops_per_chunk, threads=args.workers,
        amp=False if args.no_amp else None, channels_last=False if args.no_channels_last else None, rank=args.rank,
        world_size=args.world_size, show_progress=not args.quiet, crop_dtype=args.crop_dtype, **placement(args))


def train_config(args: argparse.Namespace):
    """The TrainConfig of a parsed ``train`` command line (imports torch)."""
    from .models import is_transformer
    from .train_config import choose_recipe, recipe_config
    if args.multiprocessing_distributed or (args.world_size and args.world_size > 1):
        raise ValueError("launch multi-GPU training with torchrun: torchrun --nproc_per_node N train.py ... "
                         "(--multiprocessing-distributed/--world-size/--dist-url are FKD's mp.spawn flags)")
    if args.pretrained:
        raise ValueError("--pretrained takes a weights name here: --pretrained-weights NAME (torchvision's, e.g. "
                         "IMAGENET1K_V1, from the local hub cache), or --init-from CHECKPOINT")
    meal_options = meal_v2_spellings(args)
    recipe = choose_recipe(args.recipe, meal_options, args.labels)
    discriminator = args.use_discriminator_loss
    if args.recipe is None and recipe == "meal-v2" and discriminator is None:
        discriminator = False  # the recipe inferred from MEAL V2's command: its FKD_train.py's default, off
    mix_fields = mixing(args)
    cos = True if args.cos or args.sched == "cosine" else False if args.sched in ("step", "linear") else \
        (None if recipe != "fkd" else is_transformer(args.arch))  # FKD: cosine for ViTs, steps for CNNs
    linear = True if args.sched == "linear" else False if cos is not None else None
    return recipe_config(
        recipe, recipe_from=tuple(meal_options) if args.recipe is None else (), unused=unused_meal_options(args),
        init_from=args.init_from, pretrained_weights=args.pretrained_weights,
        use_discriminator_loss=discriminator, d_lr=args.d_lr,
        data=args.data, arch=args.arch, labels=args.labels, softlabel_path=args.softlabel_path,
        soft_label_type=args.soft_label_type, temperature=args.temp, num_crops=args.num_crops,
        batch_size=args.batch_size, epochs=args.epochs, input_size=args.input_size, opt=args.opt, lr=args.lr,
        momentum=args.momentum, weight_decay=args.weight_decay, cos=cos, linear=linear,
        ssl_teacher=args.ssl_teacher, ssl_head=args.ssl_head, ssl_loss=args.ssl_loss, ssl_views=args.ssl_views,
        moco_k=args.moco_k, moco_m=args.moco_m, moco_dim=args.moco_dim, ce_weight=args.ce_weight,
        schedule=tuple(args.schedule) if args.schedule is not None else None, warmup_epochs=args.warmup_epochs,
        warmup_lr=args.warmup_lr, min_lr=args.min_lr, opt_eps=args.opt_eps, drop_path=args.drop_path,
        clip_grad=args.clip_grad, **mix_fields, label_smoothing=args.label_smoothing,
        scale=pair(args.scale, "--scale"), teacher_arch=args.teacher_arch, teacher_path=args.teacher_path,
        teacher_weights=args.teacher_weights, teacher_input_size=args.teacher_input_size,
        model_ema=args.model_ema, model_ema_decay=args.model_ema_decay, amp=args.amp,
        channels_last=args.channels_last, device=args.device, output=args.output, resume=args.resume or None,
        evaluate=args.evaluate, seed=args.seed if args.seed is not None else 0, workers=args.workers,
        num_classes=args.num_classes, allow_incomplete=args.allow_incomplete,
        checkpoint_every=args.checkpoint_every, checkpoint_epochs=args.checkpoint_epochs,
        max_steps=args.max_steps, val_batch_size=args.val_batch_size,
        show_progress=not args.quiet, dist_timeout=args.dist_timeout, dist_backend=args.dist_backend,
        overwrite=args.overwrite, **placement(args))


def prepare_train(args: argparse.Namespace):
    """The TrainConfig and the dataset scan of a parsed ``train`` command line, the scan started first."""
    from .dataset import DatasetError, start_train_scan
    meal_v2_spellings(args)  # DATA may be MEAL V2's --imagenet
    # The dataset scan (a child process on a large dataset) runs while torch, DALI and the model zoo import.
    try:
        scan = start_train_scan(args.data, args.evaluate)
    except DatasetError:
        scan = None  # the Trainer names the problem, after the options were checked
    try:
        cfg = train_config(args)
    except BaseException:
        if scan is not None:
            scan.cancel()
        raise
    return cfg, scan


def meal_v2_spellings(args: argparse.Namespace) -> list[str]:
    """Take MEAL V2's spellings of ``train``'s options (``--imagenet DATA``, ``--student-state-file``) as ours, in
    ``args``; returns the options of MEAL V2's own that the command line uses. Without ``--recipe`` they choose
    MEAL V2's recipe (:func:`fkd_dali.train_config.choose_recipe`): MEAL V2's spellings, or its discriminator
    on a trained start. Calling it again changes nothing."""
    used = []
    for flag, theirs, ours in (("--imagenet", "imagenet", "data"), ("--student-state-file", "student_state_file",
                                                                     "init_from")):
        value = getattr(args, theirs)
        if value is None:
            continue
        used.append(flag)
        if getattr(args, ours) not in (None, value):
            given = "DATA" if ours == "data" else "--init-from"
            raise ValueError(f"{flag} {value} and {given} {getattr(args, ours)} name two different "
                             f"{'datasets' if ours == 'data' else 'starting checkpoints'}: give one of them")
        setattr(args, ours, value)
    if args.data is None:
        raise ValueError("the dataset is missing: give DATA, the folder holding train/ and val/ (MEAL V2's "
                         "spelling, --imagenet DATA, works too)")
    used += [flag for flag, dest in MEAL_V2_UNUSED if getattr(args, dest) is not None]
    if args.use_discriminator_loss and (args.init_from or args.pretrained_weights) and not used:
        used.append("--use-discriminator-loss on a trained start")
    return used


# MEAL V2's options that its FKD_train.py parses and never uses (its soft labels come from --softlabel_path):
# accepted, recorded in the run's configuration, and said so when the run starts.
MEAL_V2_UNUSED = (("--teacher-model", "teacher_model"), ("--teacher-state-file", "teacher_state_file"))


def unused_meal_options(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(f"{flag} {getattr(args, dest)}" for flag, dest in MEAL_V2_UNUSED if getattr(args, dest) is not None)


def mixing(args: argparse.Namespace) -> dict:
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


def placement(args: argparse.Namespace) -> dict:
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


def bool_flag(p: argparse.ArgumentParser, name: str, help: str) -> None:
    p.add_argument(f"--{name}", dest=name.replace("-", "_"), action=argparse.BooleanOptionalAction, default=None,
                   help=help)


def add_train_args(t: argparse.ArgumentParser) -> None:
    t.add_argument("data", metavar="DATA", nargs="?", help="dataset root holding train/ and val/")
    t.add_argument("--imagenet", metavar="DATA", help="MEAL V2's spelling of DATA")
    t.add_argument("-a", "--arch", "--model", dest="arch", default="resnet50",
                   help="student: a torchvision model, deit_tiny, deit_small, SReT_T, SReT_LT, SReT_S, "
                        "reactnet_a")
    t.add_argument("--softlabel-path", "--softlabel_path", dest="softlabel_path", help="the label store")
    choices = objectives.label_choices()
    t.add_argument("--labels", choices=tuple(choices),
                   help="how the student learns: " + "; ".join(f"{k}: {v}" for k, v in choices.items()))
    t.add_argument("--soft-label-type", "--soft_label_type", dest="soft_label_type", default="marginal_smoothing_k5",
                   help="hard, smoothing, marginal_smoothing_kK, marginal_renorm(_kK), full (FKD's names accepted)")
    t.add_argument("--temp", type=TEMPERATURE,
                   help="temperature on the student's logits (1; --labels ssl: on both embeddings, s2-bnn 0.2; sre2l 3)")
    t.add_argument("--ssl-loss", dest="ssl_loss", choices=("kl", "cosine", "mse"),
                   help="--labels ssl / ssl-online: kl (S2-BNN's: -sum softmax(t/T) log_softmax(s/T), default), "
                        "cosine (1 - cos(s, t)) or mse (|s - t|^2 of the normalised embeddings)")
    t.add_argument("--ce-weight", dest="ce_weight", type=float,
                   help="--labels relabel-mse: weight of the cross-entropy with the image's class (G-VBSM's 0.1; "
                        "EDC's scripts 0.025)")
    t.add_argument("--ssl-teacher", dest="ssl_teacher", metavar="CKPT[,CKPT]",
                   help="--labels ssl-online: the self-supervised teacher(s), as `generate --ssl-teacher`")
    t.add_argument("--ssl-head", dest="ssl_head", metavar="HEAD", help="--ssl-teacher's head, as in generate")
    t.add_argument("--ssl-views", dest="ssl_views", choices=("fresh", "stored"),
                   help="--labels ssl-online: fresh (default: new views every pass, drawn as the store's were) or "
                        "stored (the store's own views: the same pixels as --labels ssl)")
    t.add_argument("--moco-k", dest="moco_k", type=int, metavar="K",
                   help="--labels moco: keys in the queue (MoCo's 65536; at most the images times the views seen "
                        "in a few epochs on a small set)")
    t.add_argument("--moco-m", dest="moco_m", type=float, metavar="M",
                   help="--labels moco: the key encoder's momentum (0.999)")
    t.add_argument("--moco-dim", dest="moco_dim", type=int, metavar="D", help="--labels moco: embedding size (128)")
    t.add_argument("--recipe", choices=("fkd", "meal-v2", "s2-bnn", "sre2l", "moco-v2"),
                   help="defaults of every option not given: fkd (FKD's) or meal-v2 (MEAL V2's FKD_train.py: "
                        "8 crops, -b 512, 200 epochs, lr 0.01 x0.1 at 100 and 180, no weight decay, the "
                        "discriminator on; needs --init-from or --pretrained-weights). Default: meal-v2 when the "
                        "command uses MEAL V2's own options (--imagenet, --student-state-file, --teacher-model, or "
                        "--use-discriminator-loss on a trained start), fkd otherwise; the run says which. s2-bnn: "
                        "S2-BNN's distillation-only defaults (--labels ssl, Adam lr 3e-4, no weight decay, -b 256, "
                        "200 epochs, linear decay, --temp 0.2). sre2l: SRe2L's train_FKD.py (--labels relabel, "
                        "AdamW lr 0.001, wd 0.01, -b 1024, 300 epochs, cosine as its train_FKD.sh, --temp 3). moco-v2 "
                        "(the default of --labels moco): MoCo v2's main_moco.py --mlp --moco-t 0.2 --aug-plus --cos "
                        "(SGD lr 0.03 x images a step / 256, momentum 0.9, wd 1e-4, -b 512 views = 256 images, "
                        "200 epochs, cosine, --temp 0.2)")
    t.add_argument("--init-from", dest="init_from", metavar="CHECKPOINT",
                   help="start the student from these weights (ours, FKD's, MEAL V2's or a torchvision state_dict; "
                        "same architecture and classes)")
    t.add_argument("--student-state-file", dest="student_state_file", metavar="CHECKPOINT",
                   help="MEAL V2's spelling of --init-from")
    t.add_argument("--teacher-model", dest="teacher_model",
                   help="MEAL V2's: accepted and not used (the soft labels in --softlabel-path are the teachers'; "
                        "MEAL V2's FKD_train.py does not read it either)")
    t.add_argument("--teacher-state-file", dest="teacher_state_file", help="MEAL V2's: as --teacher-model")
    t.add_argument("--pretrained-weights", dest="pretrained_weights", metavar="NAME",
                   help="start the student from torchvision's weights NAME (e.g. IMAGENET1K_V1) in the local hub "
                        "cache; their classes must be the run's")
    t.add_argument("--use-discriminator-loss", dest="use_discriminator_loss", action="store_true", default=None,
                   help="MEAL V2's discriminator on the student's softmax vs the stored soft labels (meal-v2: on)")
    t.add_argument("--no-discriminator-loss", dest="use_discriminator_loss", action="store_false",
                   help="turn the discriminator of --recipe meal-v2 off")
    t.add_argument("--d-lr", "--d_lr", dest="d_lr", type=RATE, help="the discriminator's learning rate (1e-4)")
    t.add_argument("--w-cutmix", dest="w_cutmix", action="store_true",
                   help="MEAL V2's CutMix (one box per batch; its loss weighs both images' labels by area)")
    t.add_argument("--beta", type=float, default=1.0, help="--w-cutmix: lam ~ Beta(beta, beta)")
    t.add_argument("--cutmix-prob", dest="cutmix_prob", type=float, default=1.0, help="--w-cutmix: probability")
    t.add_argument("--num-crops", "--num_crops", dest="num_crops", type=CROPS,
                   help="crops per image per step (one pass = this many epochs; fkd 4, meal-v2 8)")
    t.add_argument("-b", "--batch-size", dest="batch_size", type=POSITIVE,
                   help="crops per optimizer step over all ranks (images per step = ceil(b / num_crops); fkd 1024, "
                        "meal-v2 512)")
    t.add_argument("--epochs", type=POSITIVE, help="fkd 300, meal-v2 200")
    t.add_argument("--input-size", "--image-size", dest="input_size", type=POSITIVE, default=224)
    t.add_argument("--opt", choices=("sgd", "adamw", "adam"),
                   help="default: adamw for ViT/DeiT/SReT, sgd otherwise (s2-bnn: adam)")
    t.add_argument("--lr", "--learning-rate", dest="lr", type=RATE, help="default: 0.1 (sgd) / 0.002 (adamw)")
    t.add_argument("--momentum", type=RATE, help="SGD momentum (0.9)")
    t.add_argument("--wd", "--weight-decay", dest="weight_decay", type=RATE,
                   help="default: 1e-4 (sgd) / 0.05 (adamw); meal-v2 0")
    t.add_argument("--cos", action="store_true", help="cosine schedule (FKD's flag; the ViT recipe's default)")
    t.add_argument("--sched", choices=("cosine", "step", "linear"),
                   help="cosine, step at --schedule milestones, or linear (lr * (1 - epoch / epochs), s2-bnn's)")
    t.add_argument("--schedule", type=int, nargs="*",
                   help="step milestones (x0.1) without --cos (fkd 120 240, meal-v2 100 180)")
    t.add_argument("--warmup-epochs", dest="warmup_epochs", type=NON_NEGATIVE,
                   help="default: 5 for ViTs (single-crop), 0 else")
    t.add_argument("--warmup-lr", dest="warmup_lr", type=RATE, default=1e-5)
    t.add_argument("--min-lr", dest="min_lr", type=RATE)
    t.add_argument("--opt-eps", dest="opt_eps", type=float, default=1e-8)
    t.add_argument("--drop-path", dest="drop_path", type=float, help="stochastic depth (SReT's own default otherwise)")
    t.add_argument("--clip-grad", dest="clip_grad", type=real(0.0, above=True))
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
    t.add_argument("--teacher-input-size", dest="teacher_input_size", type=POSITIVE)
    t.add_argument("--model-ema", dest="model_ema", action="store_true", help="keep an EMA of the weights")
    t.add_argument("--model-ema-decay", dest="model_ema_decay", type=float, default=0.9998)
    bool_flag(t, "amp", "bf16 autocast (default: on with a GPU)")
    bool_flag(t, "channels-last", "channels-last memory format (default: on with a GPU)")
    t.add_argument("--device", choices=("cpu", "gpu"))
    t.add_argument("--output", "--save_checkpoint_path", "--save", dest="output",
                   help="checkpoints and log.jsonl (default runs/ARCH-LABELS); a folder holding another run's "
                        "checkpoint is refused unless --resume continues it or --overwrite replaces it")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the checkpoints and log of another run in --output (they are deleted)")
    t.add_argument("--resume", default="", help="continue from this checkpoint (or evaluate it with -e)")
    t.add_argument("-e", "--evaluate", action="store_true", help="evaluate --resume on DATA/val and exit")
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("-j", "--workers", type=POSITIVE, help="DALI threads per rank")
    t.add_argument("--num-classes", "--num_classes", dest="num_classes", type=POSITIVE)
    t.add_argument("--allow-incomplete", action="store_true", help="train on the done rows of an incomplete store")
    t.add_argument("--checkpoint-every", type=NON_NEGATIVE, default=0, help="also checkpoint every N steps")
    t.add_argument("--checkpoint-epochs", type=int, default=1,
                   help="write the checkpoint at a segment end only once N epochs passed since the last one "
                        "(default 1: every segment; the last segment, a stop signal and a new best model always "
                        "save). For short epochs, where writing it costs a noticeable share of the time")
    t.add_argument("--max-steps", type=int, help="stop after this many steps (with a checkpoint); at least 1")
    t.add_argument("--val-batch-size", type=POSITIVE, default=64)
    t.add_argument("--dist-timeout", type=real(0.0, above=True), default=600.0,
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
    g.add_argument("-a", "--arch",
                   help="teacher(s), comma-separated: a torchvision model name, 'torchscript' or 'export' with "
                        "--teacher-path, or a timm name when timm is installed (or --ssl-teacher)")
    g.add_argument("--ssl-teacher", dest="ssl_teacher", metavar="CKPT[,CKPT]",
                   help="a self-supervised teacher instead of -a: its L2-normalised embedding of every crop's view "
                        "(MoCo v2's aug-plus) goes into an embedding store for --labels ssl. CKPT: a MoCo v1/v2, "
                        "MoCo v3 (ResNet), SwAV or DINO checkpoint (the layout is read from its keys, e.g. "
                        "moco_v2_800ep_pretrain.pth.tar), or ARCH:PATH (a torchvision model's weights, with "
                        "--ssl-head); several, comma-separated: their embeddings averaged")
    g.add_argument("--ssl-head", dest="ssl_head", metavar="HEAD",
                   help="--ssl-teacher's head: none (the pooled features) or mlp:W0-W1-...-D[@PREFIX] (Linear "
                        "layers, ReLU between; at PREFIX, default where the classifier was); one, or one per teacher")
    g.add_argument("--views", choices=tuple(VIEW_PRESETS),
                   help="--ssl-teacher's view recipe: moco-v2 (default; MoCo v2's --aug-plus: jitter p 0.8, blur p "
                        "0.5) or s2-bnn (S2-BNN's Distillation_only: jitter p 0.6, blur p 0.2)")
    g.add_argument("--weights", help="torchvision weights name (e.g. IMAGENET1K_V2, DEFAULT), from the local hub cache")
    g.add_argument("--teacher-path", "--teacher_path", dest="teacher_path",
                   help="checkpoint or serialized model per teacher (comma-separated)")
    g.add_argument("--input-size", "--input_size", dest="input_size", default="224",
                   help="teacher input size (one, or one per teacher)")
    g.add_argument("--interpolation", help="crop resampling per teacher: bicubic (FKD's default), bilinear "
                   "(--ssl-teacher's default, MoCo's)")
    g.add_argument("--mean", help="per-teacher normalisation mean, e.g. 0.5/0.5/0.5 (default ImageNet's)")
    g.add_argument("--std", help="per-teacher normalisation std, e.g. 0.5/0.5/0.5 (default ImageNet's)")
    g.add_argument("--num-crops", "--num_crops", dest="num_crops", type=CROPS, default=500,
                   help=f"crops per image (C, 1..{MAX_CROPS:,})")
    g.add_argument("--num-seg", "--num_seg", dest="num_seg", type=POSITIVE, default=50,
                   help="crops cut from one decode (a group); the teacher batch is -b x --num-seg crops")
    g.add_argument("-b", "--batch-size", dest="batch_size", type=POSITIVE, default=4, help="groups per pipeline batch")
    g.add_argument("--top-k", dest="top_k", type=POSITIVE,
                   help="probabilities kept per crop (default 5; num_classes = full)")
    g.add_argument("--label-type", "--label_type", dest="label_type",
                   help="FKD's label type; sets --top-k (marginal_smoothing_k5: 5, k10: 10, hard/smoothing: 1) and "
                        "is recorded as the intended training label type")
    g.add_argument("--temp", "--temperature", dest="temperature", type=TEMPERATURE,
                   help="softmax temperature of the stored probabilities (1)")
    g.add_argument("--min-scale-crops", "--min_scale_crops", dest="min_scale_crops", type=SCALE, default=0.08)
    g.add_argument("--max-scale-crops", "--max_scale_crops", dest="max_scale_crops", type=SCALE, default=0.936)
    g.add_argument("--ratio", default="3/4,4/3", help="aspect-ratio range of the crops")
    g.add_argument("--seed", type=int, default=0, help="crops of row r depend only on (seed, r)")
    g.add_argument("--use-fp16", "--use_fp16", dest="use_fp16", action="store_true",
                   help="accepted for FKD compatibility: probabilities are always stored as float16")
    g.add_argument("--reference", "--reference-path", "--reference_path", dest="reference",
                   help="reuse the boxes and flips of this store (a new store is written; see docs)")
    g.add_argument("--device", choices=("cpu", "gpu"), help="default: the GPU when there is one")
    g.add_argument("--num-classes", dest="num_classes", type=POSITIVE,
                   help="store the teacher's class count when it differs from the dataset's (deliberately)")
    g.add_argument("--skip-corrupt", action="store_true",
                   help="leave unreadable images out (recorded in the store, never trained on) instead of stopping")
    g.add_argument("--rows-per-shard", type=POSITIVE,
                   help="images per shard file (default: about 2^20 crops per shard)")
    g.add_argument("--crops-per-chunk", type=POSITIVE, help="crops per inner chunk (default 4)")
    g.add_argument("-j", "--workers", type=POSITIVE, help="DALI CPU threads (default: the cores of this rank)")
    g.add_argument("--rank", type=NON_NEGATIVE, help="this process's rank, for launches without torchrun")
    g.add_argument("--world-size", type=POSITIVE, help="number of processes, for launches without torchrun")
    g.add_argument("-e", "--evaluate", action="store_true", help="only evaluate the teacher(s) on DATA/val")
    g.add_argument("--crop-dtype", choices=("float32", "float16"), default="float32",
                   help="dtype of the teacher's input crops out of DALI (float16 halves the bandwidth)")
    g.add_argument("--no-amp", action="store_true", help="run the teachers in float32 on the GPU (default bf16)")
    g.add_argument("--no-channels-last", action="store_true", help="keep NCHW on the GPU")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_placement_args(g)




def add_linear_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="the network to evaluate: a checkpoint of `fkd-dali train` (any objective; its classifier or "
                        "projection head is dropped), or a self-supervised checkpoint (MoCo v1/v2/v3, SwAV, DINO; "
                        "ARCH:PATH for a torchvision architecture's state_dict)")
    p.add_argument("data", metavar="DATA", help="dataset root holding train/ and val/")
    p.add_argument("-a", "--arch", help="the architecture CHECKPOINT must hold (default: the one it holds)")
    p.add_argument("--knn", type=NON_NEGATIVE, default=0, metavar="K",
                   help="also a weighted kNN (K neighbours, e.g. 20 or 200) of DATA/val against DATA/train on the "
                        "frozen features; with --epochs 0 it is all that runs")
    p.add_argument("--knn-temp", dest="knn_temperature", type=TEMPERATURE, default=0.07,
                   help="the kNN's weights are exp(cosine / T) (default 0.07, InstDisc's and DINO's)")
    p.add_argument("--epochs", type=NON_NEGATIVE, help="epochs of the linear probe (default 100; 0: no probe)")
    p.add_argument("-b", "--batch-size", dest="batch_size", type=POSITIVE, help="images per step over all ranks (256)")
    p.add_argument("--lr", "--learning-rate", dest="lr", type=RATE,
                   help="default 30 (MoCo's main_lincls.py, for a ResNet-50); S2-BNN's README evaluates its binary "
                        "ReActNet with 0.1")
    p.add_argument("--momentum", type=RATE, help="SGD momentum (0.9)")
    p.add_argument("--wd", "--weight-decay", dest="weight_decay", type=RATE, help="weight decay (0)")
    p.add_argument("--schedule", type=int, nargs="*", help="lr x0.1 at these epochs (60 80)")
    p.add_argument("--input-size", dest="input_size", type=POSITIVE, default=224,
                   help="training crop side; validation resizes to round(S * 256 / 224) and centre-crops S")
    p.add_argument("--output", help="checkpoints, log.jsonl and knn.json (default runs/ARCH-linear-eval)")
    p.add_argument("--overwrite", action="store_true", help="replace another run's checkpoints in --output")
    p.add_argument("--resume", default="", help="continue the probe from this checkpoint (the same command)")
    p.add_argument("--seed", type=int, default=0, help="draws the classifier's start and the training crops")
    p.add_argument("--device", choices=("cpu", "gpu"), help="default: the GPU when there is one")
    p.add_argument("-j", "--workers", type=POSITIVE, help="DALI threads per rank")
    p.add_argument("--val-batch-size", type=POSITIVE, default=64, help="images per batch of validation and the kNN")
    p.add_argument("--checkpoint-every", type=NON_NEGATIVE, default=0, help="also checkpoint every N steps")
    p.add_argument("--max-steps", type=POSITIVE, help="stop after this many steps (with a checkpoint)")
    bool_flag(p, "amp", "bf16 autocast (default: on with a GPU)")
    bool_flag(p, "channels-last", "channels-last memory format (default: on with a GPU)")
    p.add_argument("--dist-timeout", type=real(0.0, above=True), default=600.0,
                   help="seconds a DDP collective waits for a lost rank before the job fails (default 600)")
    p.add_argument("--dist-backend", choices=("nccl", "gloo"), help="DDP backend (as train's)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    add_placement_args(p)


def prepare_linear_eval(args: argparse.Namespace):
    """The LinearEvalConfig and the dataset scan of a parsed ``linear-eval`` command line, the scan started
    first (as :func:`prepare_train`)."""
    from .dataset import DatasetError, start_train_scan
    try:
        scan = start_train_scan(args.data)
    except DatasetError:
        scan = None  # the Trainer names the problem
    try:
        from .linear_eval import LinearEvalConfig
        given = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                     weight_decay=args.weight_decay, schedule=tuple(args.schedule) if args.schedule is not None
                     else None, amp=args.amp, channels_last=args.channels_last, device=args.device,
                     output=args.output, workers=args.workers)
        options = {k: v for k, v in given.items() if v is not None}
        options.update(input_size=args.input_size, overwrite=args.overwrite, resume=args.resume or None,
                       seed=args.seed, val_batch_size=args.val_batch_size, checkpoint_every=args.checkpoint_every,
                       max_steps=args.max_steps, dist_timeout=args.dist_timeout, dist_backend=args.dist_backend,
                       show_progress=not args.quiet, **placement(args))
        cfg = LinearEvalConfig(checkpoint=args.checkpoint, data=args.data, arch=args.arch, knn=args.knn,
                               knn_temperature=args.knn_temperature, options=options)
    except BaseException:
        if scan is not None:
            scan.cancel()
        raise
    return cfg, scan


def add_relabel_args(r: argparse.ArgumentParser) -> None:
    """``relabel``: SRe2L's relabel step (generate_soft_label.py's options, its spellings accepted) into a relabel
    store."""
    r.add_argument("data", metavar="DATA", help="dataset root holding train/ (the distilled images) or train/ itself")
    r.add_argument("--save-path", "--fkd-path", "--fkd_path", dest="save_path", required=True,
                   help="the relabel store to write (or resume)")
    r.add_argument("-a", "--arch", default="resnet18",
                   help="teacher(s), comma-separated (several: G-VBSM's norm-equalised ensemble); default resnet18")
    r.add_argument("--weights", help="torchvision weights name per teacher (from the local hub cache)")
    r.add_argument("--teacher-path", dest="teacher_path", help="teacher weights file(s), comma-separated")
    r.add_argument("--epochs", type=POSITIVE, default=300, help="passes over the images (300)")
    r.add_argument("-b", "--batch-size", dest="batch_size", type=POSITIVE, default=1024,
                   help="images per step (SRe2L's relabel.sh: 1024): the step the mixing pairs crops within; "
                        "train's -b must divide it or be a multiple of it")
    r.add_argument("--input-size", dest="input_size", type=POSITIVE, default=224)
    r.add_argument("--min-scale-crops", dest="min_scale_crops", type=SCALE, default=0.08)
    r.add_argument("--max-scale-crops", dest="max_scale_crops", type=SCALE, default=1.0)
    r.add_argument("--mix-type", dest="mix_type", choices=("cutmix", "mixup", "none"), default="cutmix")
    r.add_argument("--mixup", type=float, default=0.8, help="Mixup's Beta alpha (0.8)")
    r.add_argument("--cutmix", type=float, default=1.0, help="CutMix's Beta alpha (1.0)")
    r.add_argument("--label-format", dest="label_format", choices=("full", "topk"), default="full",
                   help="full logits (SRe2L's) or the top-k logits (--top-k)")
    r.add_argument("--top-k", dest="top_k", type=POSITIVE, default=10)
    r.add_argument("--num-classes", dest="num_classes", type=POSITIVE,
                   help="the teacher's outputs when it has more than the dataset's classes (SRe2L's students: 1000)")
    r.add_argument("--use-fp16", "--use_fp16", dest="use_fp16", action="store_true",
                   help="accepted for SRe2L compatibility: labels are float16 unless --fp32")
    r.add_argument("--fp32", action="store_true", help="store the labels as float32")
    r.add_argument("--fkd-seed", "--fkd_seed", dest="fkd_seed", type=int, default=42,
                   help="SRe2L's sampler seed: which images each step holds (42)")
    r.add_argument("--seed", type=int, default=0, help="the crops and mix plans of step (epoch, step)")
    r.add_argument("--mode", default="fkd_save", choices=("fkd_save",), help=argparse.SUPPRESS)
    r.add_argument("--device", choices=("cpu", "gpu"))
    r.add_argument("-j", "--workers", type=POSITIVE, help="DALI CPU threads")
    r.add_argument("--rows-per-shard", dest="rows_per_shard", type=POSITIVE, help="steps per shard file")
    r.add_argument("--rank", type=NON_NEGATIVE, help="this process's rank, for launches without torchrun")
    r.add_argument("--world-size", dest="world_size", type=POSITIVE, help="processes, for launches without torchrun")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def relabel_config(args: argparse.Namespace):
    """The RelabelConfig of a parsed ``relabel`` command line (imports torch)."""
    from .relabel_generate import RelabelConfig
    from .teachers import parse_teachers
    teachers = parse_teachers(args.arch, args.teacher_path, args.weights, str(args.input_size), "bilinear", None,
                              None)
    return RelabelConfig(
        data=args.data, save_path=args.save_path, teachers=teachers, epochs=args.epochs, batch_size=args.batch_size,
        mix=args.mix_type, mixup=args.mixup, cutmix=args.cutmix, label_format=args.label_format, top_k=args.top_k,
        label_dtype="float32" if args.fp32 else "float16", input_size=args.input_size,
        num_classes=args.num_classes, scale=(args.min_scale_crops, args.max_scale_crops), fkd_seed=args.fkd_seed, seed=args.seed,
        device=args.device, threads=args.workers, rows_per_shard=args.rows_per_shard, rank=args.rank,
        world_size=args.world_size, show_progress=not args.quiet)
