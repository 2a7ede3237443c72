"""SRe2L's step plan: which images make up each step of each epoch.

SRe2L (VILA-Lab/SRe2L ``relabel/generate_soft_label.py`` and ``relabel/utils_fkd.get_img2batch_idx_list``) draws
them with a ``RandomSampler`` over ``arange(N)`` whose ``torch.Generator`` is seeded once (``--fkd-seed``, 42),
batched by ``BatchSampler(batch_size, drop_last=False)`` (LPLD's pruned generation: ``drop_last=True``), one pass
per epoch from the same generator, each pass run to its end. Run to its end, torch's ``RandomSampler`` draws a
second ``randperm(N)`` for its (empty) remainder: epoch e is the (2e)-th permutation of the generator, not the
e-th; taking only N indices per epoch would give other batches from epoch 1 on. The DataLoader's own seed is
drawn from the global generator, not this one, so the plan depends on (N, B, seed, drop_last) only.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

SRE2L_SEED = 42


def sre2l_plan(num_images: int, batch_size: int, epochs: int, seed: int = SRE2L_SEED,
               drop_last: bool = False) -> Iterator[tuple[int, int, np.ndarray]]:
    """(epoch, step, images of the step: int64) for every step of the plan, in time order: torch's own sampler
    classes, each pass run to its end, as SRe2L's DataLoader runs them."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    sampler = torch.utils.data.RandomSampler(range(num_images), generator=generator)
    batches = torch.utils.data.BatchSampler(sampler, batch_size=batch_size, drop_last=drop_last)
    for epoch in range(epochs):
        for step, images in enumerate(batches):
            yield epoch, step, np.asarray(images, dtype=np.int64)
