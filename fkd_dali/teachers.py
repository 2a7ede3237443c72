"""Teachers for label generation: what a teacher is (its model and its view of the crops) and how to load it.

Sources, by ``-a ARCH`` and ``--teacher-path``:

* a torchvision classification model by name, with ``--weights NAME`` (an enum name such as
  ``IMAGENET1K_V2`` or ``DEFAULT``) taken from the local torch hub cache, never downloaded silently;
* a named architecture with a checkpoint file (a plain state_dict, or a dict holding ``state_dict`` or
  ``model``; DDP's ``module.`` prefix is removed);
* a whole serialized model: ``-a torchscript --teacher-path model.pt`` (TorchScript) or
  ``-a export --teacher-path model.pt2`` (a ``torch.export`` program, exported with a dynamic batch);
* a timm model by name when timm is installed (optional; ``--teacher-path`` as its checkpoint).

Each teacher has its own view: input size, interpolation, mean and std, recorded in the store.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Sequence
from typing import Any

import torch

from .checkpoint import TRUSTED_FIX, refused, state_mismatch, strip_ddp_prefix
from .models import torchvision_models

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SERIALIZED = ("torchscript", "export")


class TeacherError(Exception):
    """A teacher cannot be built or loaded; the message says why and what to do."""


@dataclasses.dataclass
class TeacherSpec:
    """How to build one teacher and how it sees a crop."""

    arch: str
    weights: str | None = None
    path: str | None = None
    input_size: int = 224
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def view(self) -> tuple:
        """Teachers with the same view share the same crops."""
        return (self.input_size, self.interpolation, tuple(self.mean), tuple(self.std))

    def record(self, num_classes: int) -> dict[str, Any]:
        """What the store keeps about this teacher."""
        source = (self.arch if self.arch in SERIALIZED else
                  "torchvision" if self.arch in torchvision_models() else "timm")
        return {"name": self.arch, "source": source, "weights": self.weights,
                "path": os.path.abspath(self.path) if self.path else None, "sha256": self.digest(),
                "input_size": self.input_size, "interpolation": self.interpolation, "mean": list(self.mean),
                "std": list(self.std), "num_classes": num_classes}

    def digest(self) -> str | None:
        """sha256 of the --teacher-path file: which weights labelled a store, wherever the file lies now."""
        return file_digest(self.path)


_DIGESTS: dict[tuple, str] = {}


def file_digest(path: str | None) -> str | None:
    """``sha256:...`` of a teacher's file (computed once per path, size and mtime), or None without a file."""
    if not path or not os.path.isfile(path):
        return None
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[key] = "sha256:" + h.hexdigest()
    return _DIGESTS[key]


def _torchvision():
    """torchvision, imported when a teacher needs it (~1.7 s: a TorchScript or exported teacher does not)."""
    import torchvision  # noqa: PLC0415
    return torchvision


def _timm():
    try:
        import timm  # noqa: PLC0415 - optional dependency
    except ImportError:
        return None
    return timm


def cached_weights(arch: str, weights: str, file_flag: str = "--teacher-path"):
    """The torchvision weights enum entry, after checking its file is in the local hub cache (``file_flag``: the
    option that takes a weights file instead, for the messages)."""
    try:
        enum = _torchvision().models.get_model_weights(arch)
    except (ValueError, KeyError):
        raise TeacherError(f"torchvision publishes no weights for '{arch}'; pass {file_flag}") from None
    try:
        entry = enum.DEFAULT if weights.upper() == "DEFAULT" else enum[weights]
    except KeyError:
        names = ", ".join(w.name for w in enum)
        raise TeacherError(f"'{weights}' is not a weights name of {arch}; choose one of {names} or DEFAULT") from None
    cache = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(entry.url))
    if not os.path.isfile(cache):
        raise TeacherError(
            f"the weights {arch} {entry.name} are not in the local torch hub cache ({cache}), and this tool does "
            f"not download during a run. On a machine with internet run: python -c \"import torchvision; "
            f"torchvision.models.get_model('{arch}', weights='{entry.name}')\" and copy {os.path.basename(cache)} "
            f"into {os.path.dirname(cache)} (or set TORCH_HOME), or pass the file with {file_flag}")
    return entry


def _state_dict_from(path: str) -> dict[str, torch.Tensor]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TeacherError(f"teacher checkpoint {path} does not exist") from None
    except Exception as e:
        why = refused(path, e, "tensors and plain data", TRUSTED_FIX)
        if why:
            raise TeacherError(why) from e
        raise TeacherError(f"{path} cannot be read as a checkpoint ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200]}); give a state_dict or a dict with 'state_dict' "
                           "or 'model' saved by torch.save") from e
    if isinstance(ckpt, dict):
        for key in ("state_dict", "model", "model_state", "module"):
            if key in ckpt and isinstance(ckpt[key], dict):
                ckpt = ckpt[key]
                break
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise TeacherError(f"{path} holds no state_dict (a dict of tensors, or one under 'state_dict'/'model')")
    return strip_ddp_prefix(ckpt)


def _load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str, arch: str) -> None:
    why = state_mismatch(model, state, arch)
    if why:
        raise TeacherError(f"{path} {why}. Is it a checkpoint of another architecture? Pass the matching -a; if "
                           "only the head differs, the checkpoint has another class count: pass --num-classes to "
                           "match it")
    model.load_state_dict(state)


def build_teacher(spec: TeacherSpec, num_classes: int) -> torch.nn.Module:
    """The teacher's model in eval mode with frozen parameters (on the CPU)."""
    arch = spec.arch
    if arch in SERIALIZED:
        if not spec.path:
            raise TeacherError(f"-a {arch} needs --teacher-path (the serialized model file)")
        if not os.path.isfile(spec.path):
            raise TeacherError(f"teacher file {spec.path} does not exist")
        try:
            model = torch.jit.load(spec.path, map_location="cpu") if arch == "torchscript" else \
                torch.export.load(spec.path).module()
        except Exception as e:
            kind = "TorchScript (torch.jit.save)" if arch == "torchscript" else "torch.export program (.pt2)"
            raise TeacherError(f"{spec.path} cannot be loaded as a {kind}: {type(e).__name__}: "
                               f"{str(e).splitlines()[0][:200]}") from e
    elif arch in torchvision_models():
        weights = None
        if spec.weights:
            if spec.path:
                raise TeacherError("give either --weights (torchvision's) or --teacher-path, not both")
            weights = cached_weights(arch, spec.weights)
            if len(weights.meta.get("categories", [])) != num_classes:
                raise TeacherError(f"{arch} {weights.name} has {len(weights.meta['categories'])} classes, the "
                                   f"dataset {num_classes}; pass --num-classes "
                                   f"{len(weights.meta['categories'])} to label with its classes deliberately")
            model = _torchvision().models.get_model(arch, weights=weights)
        else:
            model = _torchvision().models.get_model(arch, weights=None, num_classes=num_classes)
            if spec.path:
                _load_state(model, _state_dict_from(spec.path), spec.path, arch)
            else:
                raise TeacherError(f"{arch} needs trained weights: --weights NAME (torchvision) or --teacher-path "
                                   "FILE; a randomly initialised teacher would label nothing")
    elif _timm() is not None and _timm().is_model(arch):
        timm = _timm()
        model = timm.create_model(arch, pretrained=bool(spec.weights) and not spec.path, num_classes=num_classes)
        if spec.path:
            _load_state(model, _state_dict_from(spec.path), spec.path, arch)
    else:
        hint = "" if _timm() else " (timm is not installed, so timm names are unavailable)"
        raise TeacherError(f"unknown teacher architecture '{arch}'{hint}: use a torchvision classification model "
                           "(e.g. resnet50), -a torchscript / -a export with --teacher-path, or install timm")
    if arch != "export":  # an exported program keeps the mode it was exported in (export from model.eval())
        model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def output_classes(model: torch.nn.Module, spec: TeacherSpec, device: torch.device) -> int:
    """The teacher's class count, from one forward pass on a dummy batch of 2."""
    x = torch.zeros(2, 3, spec.input_size, spec.input_size, device=device)
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as e:
        raise TeacherError(f"teacher {spec.arch} fails on a (2, 3, {spec.input_size}, {spec.input_size}) batch: "
                           f"{type(e).__name__}: {str(e).splitlines()[0][:300]}. Check --input-size; an exported "
                           "program needs a dynamic batch dimension (torch.export.Dim)") from e
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise TeacherError(f"teacher {spec.arch} returns {type(out).__name__} "
                           f"{tuple(getattr(out, 'shape', ()))}, not (batch, classes) logits")
    return int(out.shape[1])


def parse_teachers(archs: str, paths: str | None, weights: str | None, input_size: str, interpolation: str,
                   mean: str | None, std: str | None) -> list[TeacherSpec]:
    """TeacherSpecs from comma-separated options (one value, or one per teacher)."""
    arch_list = [a.strip() for a in archs.split(",") if a.strip()]
    if not arch_list:
        raise TeacherError("-a needs at least one teacher architecture")

    def per_teacher(value: str | None, name: str) -> list[str | None]:
        if value is None:
            return [None] * len(arch_list)
        parts = [v.strip() for v in value.split(",")]
        if len(parts) == 1:
            return parts * len(arch_list)
        if len(parts) != len(arch_list):
            raise TeacherError(f"{name} has {len(parts)} values for {len(arch_list)} teachers; give one, or one "
                               "per teacher (comma-separated)")
        return parts

    def triple(v: str | None, default: Sequence[float], name: str) -> tuple[float, float, float]:
        if v is None:
            return tuple(default)
        vals = [float(x) for x in v.split("/")]
        if len(vals) != 3:
            raise TeacherError(f"{name} takes three values per teacher, e.g. 0.485/0.456/0.406")
        return tuple(vals)

    out = []
    for a, p, w, s, i, m, d in zip(arch_list, per_teacher(paths, "--teacher-path"), per_teacher(weights, "--weights"),
                                   per_teacher(input_size, "--input-size"),
                                   per_teacher(interpolation, "--interpolation"), per_teacher(mean, "--mean"),
                                   per_teacher(std, "--std")):
        out.append(TeacherSpec(arch=a, weights=w or None, path=p or None, input_size=int(s or 224),
                               interpolation=i or "bicubic", mean=triple(m, IMAGENET_MEAN, "--mean"),
                               std=triple(d, IMAGENET_STD, "--std")))
    return out
