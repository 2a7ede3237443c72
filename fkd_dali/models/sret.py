"""Sliced Recursive Transformer (SReT, Shen, Liu & Xing, arXiv 2111.05297), the ViT-family student of FKD.

Written from the paper and FKD's description of its model file: a convolutional stem (three 3x3 stride-2
conv-BN-ReLU, so 224 px gives 28x28 tokens) plus a learnable position map; three stages whose transformer
blocks are *shared and applied twice* (recursion), each application followed by its own light
"non-projection" MLP layer; attention inside groups of tokens (sliced group self-attention: the second
application of a shared block uses fewer, larger groups, over randomly permuted tokens); every residual
branch scaled by learnable scalar coefficients; depthwise strided convolutions pool between stages;
global average pooling, LayerNorm and a linear head.

Evaluation is deterministic: FKD's version draws a new token permutation on every forward pass, also in
eval mode; here training draws a fresh permutation and evaluation uses a fixed one.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn


class Scale(nn.Module):
    """A learnable scalar multiplying its input (initialised to 1)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


class MLP(nn.Sequential):
    def __init__(self, dim: int, hidden: int, drop: float):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(drop), nn.Linear(hidden, dim), nn.Dropout(drop))


class GroupAttention(nn.Module):
    """Multi-head self-attention within ``groups`` equal slices of the token sequence."""

    def __init__(self, dim: int, heads: int, attn_drop: float, proj_drop: float):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self._eval_perms: dict[tuple[int, str], torch.Tensor] = {}

    def _permutation(self, n: int, device: torch.device) -> torch.Tensor:
        if self.training:
            return torch.randperm(n, device=device)
        key = (n, str(device))
        if key not in self._eval_perms:
            g = torch.Generator().manual_seed(n)
            self._eval_perms[key] = torch.randperm(n, generator=g).to(device)
        return self._eval_perms[key]

    def forward(self, x: torch.Tensor, groups: int, shuffle: bool) -> torch.Tensor:
        B, N, C = x.shape
        if N % groups:
            raise ValueError(f"SReT: {N} tokens cannot be sliced into {groups} groups; use an input size divisible "
                             "by 8 * 4 (e.g. 224) so every stage's token count divides its groups")
        order = self._permutation(N, x.device) if shuffle and groups > 1 else None
        if order is not None:
            x = x[:, order]
        h = self.heads
        qkv = self.qkv(x).reshape(B, groups, N // groups, 3, h, C // h).permute(3, 0, 1, 4, 2, 5)
        q, k, v = qkv[0], qkv[1], qkv[2]                       # (B, groups, heads, N/groups, C/heads)
        attn = self.attn_drop(((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1))
        x = (attn @ v).permute(0, 1, 3, 2, 4).reshape(B, N, C)
        if order is not None:
            x = x[:, torch.argsort(order)]
        return self.proj_drop(self.proj(x))


class SharedBlock(nn.Module):
    """Pre-norm transformer block; ``x*a + b*attn(norm(x))``, ``x*c + d*mlp(norm(x))`` with learnable a..d."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, drop: float, attn_drop: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = GroupAttention(dim, heads, attn_drop, drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio), drop)
        from torchvision.ops import StochasticDepth  # noqa: PLC0415 - torchvision costs ~1.7 s to import
        self.drop_path = StochasticDepth(drop_path, "row")
        self.scales = nn.ModuleList(Scale() for _ in range(4))

    def forward(self, x: torch.Tensor, groups: int, shuffle: bool) -> torch.Tensor:
        s = self.scales
        x = s[0](x) + s[1](self.drop_path(self.attn(self.norm1(x), groups, shuffle)))
        return s[2](x) + s[3](self.drop_path(self.mlp(self.norm2(x))))


class NonProjection(nn.Module):
    """The light layer after each recursive application: ``x*a + b*mlp(norm(x))``."""

    def __init__(self, dim: int, mlp_ratio: float, drop: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio), drop)
        self.scales = nn.ModuleList(Scale() for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scales[0](x) + self.scales[1](self.mlp(self.norm(x)))


class Stage(nn.Module):
    """``shared`` blocks, each applied ``loops`` times; application j of a block slices its tokens into
    ``groups[0]`` groups the first time and ``groups[1]`` (shuffled) afterwards."""

    def __init__(self, dim: int, heads: int, depth: int, shared: int, groups: tuple[int, int], mlp_ratio: float,
                 np_mlp_ratio: float, drop: float, attn_drop: float, drop_paths: list[float]):
        super().__init__()
        if depth % shared:
            raise ValueError(f"stage depth {depth} is not a multiple of its {shared} shared blocks")
        self.loops = depth // shared
        self.groups = groups
        self.blocks = nn.ModuleList(SharedBlock(dim, heads, mlp_ratio, drop, attn_drop, drop_paths[i])
                                    for i in range(shared))
        self.non_proj = nn.ModuleList(NonProjection(dim, np_mlp_ratio, drop) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)
        k = 0
        for block in self.blocks:
            for loop in range(self.loops):
                recursive = loop > 0
                x = block(x, self.groups[1] if recursive else self.groups[0], shuffle=recursive)
                x = self.non_proj[k](x)
                k += 1
        return x.transpose(1, 2).reshape(B, C, H, W)


@dataclasses.dataclass(frozen=True)
class SReTConfig:
    base_dim: int
    heads: tuple[int, int, int]
    depth: tuple[int, int, int] = (4, 10, 6)
    shared: tuple[int, int, int] = (2, 5, 3)
    groups1: tuple[int, int, int] = (8, 4, 1)
    groups2: tuple[int, int, int] = (2, 1, 1)
    mlp_ratio: float = 4.0
    np_mlp_ratio: float = 1.0
    drop_path: float = 0.1


CONFIGS = {
    "SReT_T": SReTConfig(base_dim=32, heads=(2, 4, 8), mlp_ratio=3.6, drop_path=0.1),
    "SReT_LT": SReTConfig(base_dim=32, heads=(2, 4, 8), mlp_ratio=4.0, drop_path=0.1),
    "SReT_S": SReTConfig(base_dim=42, heads=(3, 6, 12), mlp_ratio=3.0, np_mlp_ratio=2.0, drop_path=0.2),
}


class SReT(nn.Module):
    def __init__(self, cfg: SReTConfig, num_classes: int = 1000, image_size: int = 224, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float | None = None):
        super().__init__()
        if image_size % 8:
            raise ValueError(f"SReT needs an input size divisible by 8, got {image_size}")
        dims = [cfg.base_dim * h for h in cfg.heads]
        c0 = dims[0]
        self.stem = nn.Sequential(
            nn.Conv2d(3, c0 // 2, 3, stride=2, padding=1), nn.BatchNorm2d(c0 // 2), nn.ReLU(inplace=True),
            nn.Conv2d(c0 // 2, c0, 3, stride=2, padding=1), nn.BatchNorm2d(c0), nn.ReLU(inplace=True),
            nn.Conv2d(c0, c0, 3, stride=2, padding=1), nn.BatchNorm2d(c0), nn.ReLU(inplace=True))
        self.pos_embed = nn.Parameter(torch.zeros(1, c0, image_size // 8, image_size // 8))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(drop)
        rate = cfg.drop_path if drop_path is None else drop_path
        total = sum(cfg.depth)
        self.stages = nn.ModuleList()
        self.pools = nn.ModuleList()
        first = 0
        for s in range(3):
            paths = [rate * (first + i) / total for i in range(cfg.depth[s])]
            first += cfg.depth[s]
            self.stages.append(Stage(dims[s], cfg.heads[s], cfg.depth[s], cfg.shared[s],
                                     (cfg.groups1[s], cfg.groups2[s]), cfg.mlp_ratio, cfg.np_mlp_ratio, drop,
                                     attn_drop, paths))
            if s < 2:  # depthwise strided pooling to the next stage's width
                self.pools.append(nn.Conv2d(dims[s], dims[s + 1], 3, stride=2, padding=1, groups=dims[s]))
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pos_drop(self.stem(x) + self.pos_embed)
        for s, stage in enumerate(self.stages):
            x = stage(x)
            if s < 2:
                x = self.pools[s](x)
        return self.norm(x.mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def sret(name: str, num_classes: int = 1000, image_size: int = 224, **kw) -> SReT:
    return SReT(CONFIGS[name], num_classes=num_classes, image_size=image_size, **kw)
