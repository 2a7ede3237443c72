"""Tiny students for tests and smoke runs, as timm keeps its ``test_*`` models: a few thousand parameters, a
training step in milliseconds on a CPU, and the same code paths as the full-size models (``tiny_cnn``:
convolutions, BatchNorm running statistics, SGD with weight decay; ``tiny_vit``: torchvision's
VisionTransformer with its class token, AdamW's no-decay groups). Not meant to reach any accuracy."""

from __future__ import annotations

from torch import nn


class TinyCNN(nn.Sequential):
    """Three 3x3 convolutions (the last two with stride 2), each with BatchNorm and ReLU, global average pooling
    and a linear classifier: about 24k parameters at ``width`` 16."""

    def __init__(self, num_classes: int, width: int = 16):
        def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True)]
        super().__init__(*block(3, width, 1), *block(width, 2 * width, 2), *block(2 * width, 4 * width, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, num_classes))


def tiny_vit(num_classes: int, image_size: int) -> nn.Module:
    """Two transformer layers of width 32 (two heads) on 8-px patches (image sides divisible by 8)."""
    from torchvision.models.vision_transformer import VisionTransformer  # noqa: PLC0415 - see models/__init__
    return VisionTransformer(image_size=image_size, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                             mlp_dim=64, num_classes=num_classes)


TINY = {"tiny_cnn": lambda classes, size: TinyCNN(classes), "tiny_vit": tiny_vit}
