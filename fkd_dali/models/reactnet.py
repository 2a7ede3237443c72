"""ReActNet-A (Liu, Shen, Savvides & Cheng, ECCV 2020, arXiv 2003.03488), the 1-bit student of S2-BNN and FKD-SSL.

Written from the paper, with the details the paper leaves open read from its authors' code (liuzechun/ReActNet
``mobilenet/2_step2``): MobileNet-V1's layout (widths 32-64-128-128-256-256-512x6-1024-1024, five stride-2 steps)
with every depthwise/pointwise pair replaced by a block of a *binary* 3x3 and a *binary* 1x1 convolution (normal,
not depthwise), each followed by BatchNorm and bypassed by a real-valued shortcut (2x2 average pooling where the
block has stride 2). A block that doubles the width runs two 1x1 convolutions on the same input, adds the
shortcut to each and concatenates them. Before each binary convolution an RSign, after each shortcut sum an
RPReLU. The first convolution (3 -> 32, stride 2, with BatchNorm and no activation) and the classifier are
real-valued.

- RSign: ``+1 if x > alpha_c else -1`` with a learnable threshold per channel (the paper's eq. 1; 0 is -1, so
  every activation is exactly +-1, where the authors' ``torch.sign`` would give 0 at 0). Its backward is
  ApproxSign's (Bi-Real Net's piecewise quadratic, the authors' ``BinaryActivation``): the gradient times
  ``2 - 2|x - alpha_c|`` inside ``|x - alpha_c| < 1``, zero outside.
- RPReLU: ``PReLU_c(x - gamma_c) + zeta_c`` (the paper's eq. 2), slope and both shifts learnable per channel.
- Binary weights: ``mean_c|W| * sign(W)`` with the mean taken per output channel over its inputs and kernel and
  not differentiated (as the authors' code). Backward: the clipped straight-through estimator of that code, the
  gradient passed to the latent real weights where ``|W| <= 1``, zero elsewhere (``sign(0)`` is -1 as above).
  The latent weights start uniform in (-0.001, 0.001): the authors' magnitude (their ``rand * 0.001``) made
  symmetric, so that the output channels of a binary convolution do not all start equal.

Parameters: 29,343,592 for 1000 classes (28,253,184 of them in the binary convolutions); 4.82e9 binary and
1.19e7 real multiply-adds at 224 px, so 0.87e8 OPs (BOPs / 64 + FLOPs) as the authors' README states.

Backbone convention (for heads of other objectives, e.g. an SSL projection MLP): ``num_features`` is the width
of the pooled features (1024), ``forward_features(x)`` returns them as ``(N, num_features)``, and the classifier
is the attribute ``fc`` (as in torchvision's ResNets and in S2-BNN, whose MoCo wrapper replaces ``fc`` by its
MLP head): ``forward(x) == fc(forward_features(x))``, so replacing ``fc`` replaces the head.

Any input size works (224 in the paper; a side divisible by 32 halves exactly at each of the five stride-2
steps, other sides round up there, the shortcuts' pooling as the strided convolutions).
"""

from __future__ import annotations

import torch
from torch import nn

STEM_WIDTH = 32
# (output width, stride) of the 13 blocks: MobileNet-V1's depthwise-separable layers.
LAYOUT = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1), (512, 1),
          (512, 1), (1024, 2), (1024, 1))


def binarize(x: torch.Tensor) -> torch.Tensor:
    """+1 where ``x > 0``, -1 elsewhere, in ``x``'s dtype."""
    return (x > 0).to(x.dtype) * 2 - 1


class ApproxSign(torch.autograd.Function):
    """Forward ``binarize(x)``; backward ApproxSign's derivative ``max(0, 2 - 2|x|)``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return binarize(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * (2 - 2 * x.abs()).clamp_(min=0)


class BinaryWeight(torch.autograd.Function):
    """Forward ``mean|W|`` (per output channel, not differentiated) ``* binarize(W)``; backward the clipped
    straight-through estimator (the gradient where ``|W| <= 1``)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(w)
        scale = w.abs().mean(dim=(1, 2, 3), keepdim=True)
        return torch.where(w > 0, scale, -scale)  # one pass over the weights: they are most of the model

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (w,) = ctx.saved_tensors
        return torch.where(w.abs() <= 1, grad, 0)


class BinaryConv2d(nn.Conv2d):
    """A convolution without bias whose forward uses the binarized ``weight`` (the latent real weights)."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int = 1):
        super().__init__(cin, cout, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.weight, -1e-3, 1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, BinaryWeight.apply(self.weight), None)


class RSign(nn.Module):
    """``+1 if x > threshold_c else -1`` (ApproxSign's gradient), the threshold learnable per channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.threshold = nn.Parameter(torch.zeros(channels))  # 1-D: no weight decay under AdamW

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ApproxSign.apply(x - self.threshold.view(1, -1, 1, 1))


class RPReLU(nn.Module):
    """``PReLU_c(x - gamma_c) + zeta_c`` with per-channel slope and shifts."""

    def __init__(self, channels: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(channels))
        self.prelu = nn.PReLU(channels)
        self.zeta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prelu(x - self.gamma.view(1, -1, 1, 1)) + self.zeta.view(1, -1, 1, 1)


class Block(nn.Module):
    """RSign -> binary 3x3 (stride s) -> BN, + shortcut (2x2 average pool when s = 2) -> RPReLU -> RSign ->
    binary 1x1 -> BN, + shortcut -> RPReLU. Doubling the width: two 1x1 branches, each plus the shortcut,
    concatenated."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        if cout not in (cin, 2 * cin):
            raise ValueError(f"a ReActNet block keeps or doubles its width, not {cin} -> {cout}")
        self.sign1 = RSign(cin)
        self.conv3x3 = BinaryConv2d(cin, cin, 3, stride)
        self.bn1 = nn.BatchNorm2d(cin)
        self.shortcut = nn.AvgPool2d(2, 2, ceil_mode=True) if stride == 2 else nn.Identity()
        self.act1 = RPReLU(cin)
        self.sign2 = RSign(cin)
        branches = cout // cin
        self.conv1x1 = nn.ModuleList(BinaryConv2d(cin, cin, 1) for _ in range(branches))
        self.bn2 = nn.ModuleList(nn.BatchNorm2d(cin) for _ in range(branches))
        self.act2 = RPReLU(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv3x3(self.sign1(x))) + self.shortcut(x))
        b = self.sign2(x)
        outs = [bn(conv(b)) + x for conv, bn in zip(self.conv1x1, self.bn2)]
        return self.act2(outs[0] if len(outs) == 1 else torch.cat(outs, dim=1))


class ReActNet(nn.Module):
    def __init__(self, num_classes: int = 1000, layout: tuple[tuple[int, int], ...] = LAYOUT):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, STEM_WIDTH, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(STEM_WIDTH))
        blocks, width = [], STEM_WIDTH
        for cout, stride in layout:
            blocks.append(Block(width, cout, stride))
            width = cout
        self.blocks = nn.Sequential(*blocks)
        self.num_features = width
        self.fc = nn.Linear(width, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x)).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


REACTNET = {"reactnet_a": lambda classes, size: ReActNet(classes)}  # by name, as models/tiny.py's TINY
