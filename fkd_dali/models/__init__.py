"""Students by name (``create_model``), as timm does it: any torchvision classification model, the DeiT
configurations of torchvision's VisionTransformer, SReT, ReActNet-A (1-bit), and two tiny models for tests and
smoke runs.

torchvision is imported when a model needs it (it costs ~1.7 s of every process's start: its ops import
torch._dynamo), so a run of the tiny CNN, and ``generate`` with a TorchScript teacher, start without it."""

from __future__ import annotations

import torch

from .reactnet import REACTNET
from .sret import CONFIGS as SRET_CONFIGS
from .sret import SReT, sret
from .tiny import TINY

# DeiT (Touvron et al. 2021) sizes: patch 16, 12 layers; tiny 3 heads x 64, small 6 heads x 64.
DEIT = {"deit_tiny": dict(num_heads=3, hidden_dim=192, mlp_dim=768),
        "deit_small": dict(num_heads=6, hidden_dim=384, mlp_dim=1536),
        "deit_base": dict(num_heads=12, hidden_dim=768, mlp_dim=3072)}
TORCHVISION_TRANSFORMERS = ("vit_", "swin_", "maxvit")  # name prefixes of torchvision's transformer families


class ModelError(Exception):
    """Unknown architecture or unusable settings."""


def torchvision_models() -> set[str]:
    import torchvision  # noqa: PLC0415 - see the module docstring
    return set(torchvision.models.list_models(module=torchvision.models))


def is_transformer(name: str) -> bool:
    """ViT-family students train with FKD's ViT recipe (AdamW, warm-up) by default."""
    return name in DEIT or name in SRET_CONFIGS or name == "tiny_vit" or name.startswith(TORCHVISION_TRANSFORMERS)


def classifier_name(model: torch.nn.Module) -> str:
    """The name of ``model``'s classifier: its last Linear module (``fc`` of a ResNet or ReActNet, ``heads.head`` of
    a ViT, ``11`` of ``tiny_cnn``); what a checkpoint stores there (a Linear, or a self-supervised student's MLP
    projection head) is not part of the backbone."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if not names:
        raise ModelError(f"{type(model).__name__} has no Linear classifier")
    return names[-1]


def without_classifier(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its classifier replaced by Identity: it gives the features the classifier would read."""
    parent, _, leaf = classifier_name(model).rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, torch.nn.Identity())
    return model


def available() -> list[str]:
    return sorted(torchvision_models() | set(DEIT) | set(SRET_CONFIGS) | set(REACTNET) | set(TINY))


def create_model(name: str, num_classes: int, image_size: int = 224, drop_path: float | None = None) -> torch.nn.Module:
    if name in SRET_CONFIGS:
        return sret(name, num_classes=num_classes, image_size=image_size, drop_path=drop_path)
    if name in REACTNET:
        return REACTNET[name](num_classes, image_size)
    if name in TINY:
        return TINY[name](num_classes, image_size)
    if name in DEIT:
        from torchvision.models.vision_transformer import VisionTransformer  # noqa: PLC0415
        return VisionTransformer(image_size=image_size, patch_size=16, num_layers=12, num_classes=num_classes,
                                 **DEIT[name])
    if name in torchvision_models():
        import torchvision  # noqa: PLC0415
        kw = {"image_size": image_size} if name.startswith("vit_") else {}
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kw)
    raise ModelError(f"unknown architecture '{name}'; choose a torchvision classification model (e.g. resnet50), "
                     f"deit_tiny, deit_small, SReT_T, SReT_LT, SReT_S, reactnet_a, or tiny_cnn / tiny_vit for tests")


__all__ = ["DEIT", "ModelError", "SReT", "available", "classifier_name", "create_model", "is_transformer",
           "torchvision_models", "without_classifier"]
