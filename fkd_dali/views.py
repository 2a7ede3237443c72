"""Self-supervised views: MoCo v2's "aug-plus" drawn per crop from ``(seed, row)``, like :mod:`fkd_dali.crops`.

facebookresearch/moco ``main_moco.py --aug-plus`` compose, per view (S2-BNN's ``Distillation_only`` the same with the
jitter at p 0.6 and the blur at p 0.2: ``generate --views s2-bnn``)::

    RandomResizedCrop(224, scale=(0.2, 1.))
    RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8)
    RandomGrayscale(p=0.2)
    RandomApply([GaussianBlur([.1, 2.])], p=0.5)      # sigma ~ U(0.1, 2.0), PIL's GaussianBlur(radius=sigma)
    RandomHorizontalFlip()

The crop and flip are :func:`fkd_dali.crops.sample_crops` with that scale (FKD's exact RandomResizedCrop). The
photometric draws follow torchvision: ``ColorJitter.get_params`` draws the order of its four ops as a uniform
random permutation (``torch.randperm(4)``) and each factor uniformly: brightness, contrast, saturation in
``[1 - 0.4, 1 + 0.4]``, hue in ``[-0.1, 0.1]``. They come from their own generator per row, seeded by
``(seed, row, 1)``, so a row's views depend only on (seed, row, its image size), whichever rank or block draws
them. A crop whose jitter is not applied gets the identity factors (1, 1, 1, 0) and order (0, 1, 2, 3); a crop
without blur gets sigma 0. The replay of these parameters is ``pipelines.graphs.ssl_views``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from labelstore.kinds import IDENTITY_FACTORS, MOCO_V2_VIEWS, check_views

from .crops import sample_crops

PHOTOMETRIC_STREAM = 1  # the row generator's third seed word: photometric draws never shift the crops'


def view_recipe(views: dict | None = None) -> dict:
    """MoCo v2's recipe with ``views``' entries replacing its own, checked (ValueError names the value)."""
    return check_views(dict(MOCO_V2_VIEWS) | dict(views or {}))


def sample_views(seed: int, rows: Sequence[int], sizes: np.ndarray, num_crops: int,
                 views: dict | None = None) -> dict[str, np.ndarray]:
    """Per row and crop: ``boxes`` (m, C, 4), ``flips`` (m, C), and the photometric parameters ``jitter`` (m, C)
    bool, ``jitter_factors`` (m, C, 4) float32, ``jitter_order`` (m, C, 4) int8, ``grayscale`` (m, C) bool,
    ``blur_sigma`` (m, C) float32 (0: no blur), the arrays of an embedding store."""
    v = view_recipe(views)
    boxes, flips = sample_crops(seed, rows, sizes, num_crops, v["scale"], v["ratio"], v["flip_p"])
    m, C = len(rows), num_crops
    # per crop: apply jitter, 4 keys of the order, 4 factors, apply grayscale, apply blur, sigma
    u = np.empty((m, C, 12))
    for i, row in enumerate(rows):
        u[i] = np.random.default_rng([int(seed), int(row), PHOTOMETRIC_STREAM]).random((C, 12))
    jitter = u[..., 0] < v["jitter_p"]
    order = np.argsort(u[..., 1:5], axis=-1).astype(np.int8)  # argsort of iid uniforms: a uniform permutation
    b, c, s, h = v["jitter"]
    lo = np.array([max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h])
    hi = np.array([1 + b, 1 + c, 1 + s, h])
    factors = (lo + (hi - lo) * u[..., 5:9]).astype(np.float32)
    factors = np.where(jitter[..., None], factors, np.array(IDENTITY_FACTORS, np.float32))
    order = np.where(jitter[..., None], order, np.arange(4, dtype=np.int8))
    grayscale = u[..., 9] < v["grayscale_p"]
    lo_s, hi_s = v["blur_sigma"]
    sigma = np.where(u[..., 10] < v["blur_p"], lo_s + (hi_s - lo_s) * u[..., 11], 0.0).astype(np.float32)
    return {"boxes": boxes, "flips": flips, "jitter": jitter, "jitter_factors": factors,
            "jitter_order": order.astype(np.int8), "grayscale": grayscale, "blur_sigma": sigma}


FRESH_STREAM = 2  # the third word of a pass's seed: fresh views never coincide with a store's (seed, row) draws


def pass_seed(seed: int, pass_index: int, num_crops: int) -> int:
    """The seed of pass ``pass_index``'s fresh views of ``num_crops`` views per image (``--labels moco``,
    ``ssl-online``): every pass draws new views, and the same (seed, pass, crops) draws the same ones, on any rank,
    after a resume. The crop count is part of it: segments with other crop counts restart their pass count at 0, and
    a 1-view pass 0 must not repeat view 0 of a 4-view pass 0."""
    return int(np.random.SeedSequence([int(seed), int(pass_index), FRESH_STREAM, int(num_crops)]).generate_state(1)[0])


def fresh_views(seed: int, pass_index: int, rows: Sequence[int], sizes: np.ndarray, num_crops: int,
                views: dict | None = None) -> dict[str, np.ndarray]:
    """:func:`sample_views` of pass ``pass_index``: per row ``num_crops`` views drawn from ``(pass_seed, row)``, the pass seed
    of (seed, pass, num_crops)."""
    return sample_views(pass_seed(seed, pass_index, num_crops), rows, sizes, num_crops, views)
