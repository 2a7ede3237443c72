"""The replay of a relabel store's steps against SRe2L's own formulas (VILA-Lab/SRe2L @8d00cba relabel/utils_fkd.py),
written here with torchvision/PIL on the same JPEGs: the crop from the normalised box (RandomResizedCropWithCoords's
replay + torchvision's resized_crop on PIL), the flip, ToTensor + Normalize, then mix_aug's CutMix / Mixup."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from pipelines.graphs import IMAGENET_MEAN, IMAGENET_STD
from pipelines.relabel import EpochSteps, RelabelLoader, batch_refusal, step_pieces
from tests.conftest import current_device, textured, write_jpeg

DEVICE = current_device()
S = 32
SHAPES = [(48, 64), (64, 48), (40, 40), (56, 72), (33, 47), (61, 50)]


def sre2l_coords(h: int, w: int) -> torch.Tensor:
    """SRe2L's save path: torchvision's RandomResizedCrop.get_params (torch's global RNG), normalised (float32)."""
    i, j, hh, ww = RandomResizedCrop.get_params(Image.new("RGB", (w, h)), (0.08, 1.0), (3 / 4, 4 / 3))
    return torch.FloatTensor((i / h, j / w, hh / h, ww / w))


def sre2l_replay(path: str, coords: torch.Tensor, flip: bool) -> torch.Tensor:
    """RandomResizedCropWithCoords (load mode) + RandomHorizontalFlipWithRes + ToTensor + Normalize, as SRe2L."""
    img = Image.open(path).convert("RGB")
    i = coords[0].item() * img.size[1]
    j = coords[1].item() * img.size[0]
    h = coords[2].item() * img.size[1]
    w = coords[3].item() * img.size[0]
    img = TF.resized_crop(img, i, j, h, w, [S, S], TF.InterpolationMode.BILINEAR)
    if flip:
        img = TF.hflip(img)
    return TF.normalize(TF.to_tensor(img), IMAGENET_MEAN, IMAGENET_STD)


def sre2l_mix(images: torch.Tensor, mode: str, rand_index: torch.Tensor, lam: float, bbox) -> torch.Tensor:
    images = images.clone()
    if mode == "cutmix":
        bbx1, bby1, bbx2, bby2 = bbox
        images[:, :, bbx1:bbx2, bby1:bby2] = images[rand_index, :, bbx1:bbx2, bby1:bby2]
        return images
    if mode == "mixup":
        return lam * images + (1 - lam) * images[rand_index]
    return images


def rand_bbox(rng: np.random.Generator, size, lam: float):
    """SRe2L's rand_bbox (its W is size[2], its H size[3])."""
    W, H = size[2], size[3]
    cut_rat = np.sqrt(1.0 - lam)
    cut_w, cut_h = int(W * cut_rat), int(H * cut_rat)
    cx, cy = rng.integers(W), rng.integers(H)
    return (int(np.clip(cx - cut_w // 2, 0, W)), int(np.clip(cy - cut_h // 2, 0, H)),
            int(np.clip(cx + cut_w // 2, 0, W)), int(np.clip(cy + cut_h // 2, 0, H)))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("relabel_replay"))
    rng = np.random.default_rng(3)
    files = []
    for k, (h, w) in enumerate(SHAPES):
        files.append(f"c{k % 2}/img_{k}.jpg")
        write_jpeg(os.path.join(root, files[-1]), textured(rng, h, w))
    return root, files


def plan_of(n: int, mode: str, seed: int, steps: int = 1) -> EpochSteps:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    rows = np.concatenate([rng.permutation(n) for _ in range(steps)])
    coords = torch.stack([sre2l_coords(*SHAPES[r]) for r in rows]).numpy()
    flips = rng.random(len(rows)) < 0.5
    partner = np.concatenate([rng.permutation(n) for _ in range(steps)])
    lam = rng.beta(1.0, 1.0, steps).astype(np.float32)
    box = np.array([rand_bbox(rng, (n, 3, S, S), float(v)) if mode == "cutmix" else (0, 0, 0, 0) for v in lam])
    return EpochSteps(rows=rows, starts=np.arange(steps + 1) * n, coords=coords, flips=flips, partner=partner,
                      lam=lam, box=box)


def loader_for(folder, plan: EpochSteps, mode: str, batch: int, rank: int = 0, world: int = 1) -> RelabelLoader:
    root, files = folder
    return RelabelLoader(root, files, [k % 2 for k in range(len(files))], np.array(SHAPES), steps_of=lambda e: plan,
                         stored_step=plan.step_size(0), mix=mode, batch_size=batch, crop_size=S, device=DEVICE,
                         rank=rank, world_size=world, num_threads=1)


def reference(folder, plan: EpochSteps, mode: str, step: int = 0) -> torch.Tensor:
    root, files = folder
    a, b = plan.starts[step], plan.starts[step + 1]
    crops = torch.stack([sre2l_replay(os.path.join(root, files[r]), torch.from_numpy(plan.coords[p]), plan.flips[p])
                         for p, r in zip(range(a, b), plan.rows[a:b])])
    return sre2l_mix(crops, mode, torch.from_numpy(plan.partner[a:b]), float(plan.lam[step]), plan.box[step])


GREY = 1 / 255 / min(IMAGENET_STD)  # one grey level, in normalised units


@pytest.mark.parametrize("mode", ["cutmix", "mixup", "none"])
def test_replayed_mixed_crops_are_sre2l_pixels(folder, mode):
    """One step of 6 crops: the replayed, mixed batch equals SRe2L's within one grey level away from the crops'
    outermost pixel (where DALI's ROI resize reads pixels outside the box, tests/test_loader.py's fidelity)."""
    plan = plan_of(len(SHAPES), mode, seed=8)  # CutMix box rows 2:22, columns 0:16 (not symmetric)
    ld = loader_for(folder, plan, mode, batch=len(SHAPES))
    ld.set_epoch(0)
    (got,) = list(ld)
    want = reference(folder, plan, mode)
    assert got["positions"].tolist() == list(range(len(SHAPES)))
    assert got["indices"].tolist() == plan.rows.tolist()
    d = (got["images"].cpu().float() - want).abs()
    assert d[:, :, 1:-1, 1:-1].max() <= 1.01 * GREY, d[:, :, 1:-1, 1:-1].max() / GREY
    assert d.mean() < 0.5 * GREY
    if mode == "cutmix":
        assert plan.box[0].tolist() == [2, 0, 22, 16]


def test_pieces_of_a_step_over_ranks_replay_the_same_mixed_crops(folder):
    """A step of 6 trained as 3 pieces of 2 over 2 ranks (1 crop each): each rank decodes its crop and its partner,
    and the crops it trains are the whole-step replay's."""
    plan = plan_of(len(SHAPES), "cutmix", seed=9, steps=2)
    whole = torch.cat([reference(folder, plan, "cutmix", s) for s in range(2)])
    seen = {}
    for rank in range(2):
        ld = loader_for(folder, plan, "cutmix", batch=1, rank=rank, world=2)
        ld.set_epoch(0)
        batches = list(ld)
        assert len(batches) == 6  # 2 steps x 3 pieces, the same count on each rank
        for s, b in enumerate(batches):
            for img, pos in zip(b["images"], b["positions"].tolist()):
                seen[(s // 3, pos)] = img.cpu()
    assert len(seen) == 12
    for (s, pos), img in seen.items():
        d = (img - whole[s * 6 + pos]).abs()[:, 1:-1, 1:-1].max()
        assert d <= 1.01 * GREY


@pytest.mark.parametrize("world", [1, 2])
def test_a_batch_of_whole_steps_mixes_each_step_by_its_own_plan(folder, world):
    """-b 12 over steps of 6 (two whole steps per batch; 3 steps: batches [0, 1] and [2]): every crop equals its
    own step's SRe2L replay (each step's CutMix box and partners), on 1 rank or cut over 2."""
    plan = plan_of(len(SHAPES), "cutmix", seed=11, steps=3)
    assert len({tuple(b) for b in plan.box.tolist()}) == 3  # three different boxes
    whole = torch.cat([reference(folder, plan, "cutmix", s) for s in range(3)])
    seen = {}
    for rank in range(world):
        ld = loader_for(folder, plan, "cutmix", batch=12 // world, rank=rank, world=world)
        assert len(ld) == 2
        ld.set_epoch(0)
        batches = list(ld)
        assert len(batches) == 2
        for k, b in enumerate(batches):
            pos = b["positions"].tolist()
            # 1 rank: batch 0 = steps 0 then 1, batch 1 = step 2; 2 ranks: batch 0 = step <rank>, batch 1 = half of 2
            steps = [2 * k + j // 6 for j in range(len(pos))] if world == 1 else [rank if k == 0 else 2] * len(pos)
            for img, s, p in zip(b["images"], steps, pos):
                seen[(s, p)] = img.cpu()
    assert len(seen) == 18
    for (s, pos), img in seen.items():
        d = (img - whole[s * 6 + pos]).abs()[:, 1:-1, 1:-1].max()
        assert d <= 1.01 * GREY, (s, pos)


def test_batch_sizes_the_plan_cannot_serve_are_refused_with_the_sizes_to_use():
    assert batch_refusal([12, 12, 5], 6, 1) is None
    assert batch_refusal([12, 12, 5], 3, 2) is None
    why = batch_refusal([12, 12, 5], 5, 1)
    assert "-b 5" in why and "neither divides the stored step of 12" in why and "1, 2, 3, 4, 6, 12" in why
    assert "multiple of it (per rank: 24, 36, 48)" in why
    assert batch_refusal([12], 12, 2) is None and batch_refusal([12, 12, 5], 18, 2) is None  # 3 whole steps
    assert "-b 30" in batch_refusal([12], 15, 2)  # 2.5 steps: refused
    assert "a stored step of 1 crops is fewer than the 2 ranks" in batch_refusal([12, 1], 12, 2)
    why = batch_refusal([12, 12, 1], 3, 2)  # the last step's single crop cannot be cut over 2 ranks
    assert "last piece of 1 crops" in why
    pieces = step_pieces(5, 4, 2, 1)
    assert [o.tolist() for o, _ in pieces] == [[2, 3], []] and [p.tolist() for _, p in pieces] == [[0, 1, 2, 3], [4]]


def test_an_image_not_of_its_stored_size_is_refused_by_name(folder):
    """The graph compares each image's header with its stored size before any box is used (graphs.fit_rois)."""
    from pipelines import LoaderError
    root, files = folder
    plan = plan_of(len(SHAPES), "cutmix", seed=8)
    sizes = np.array(SHAPES)
    sizes[plan.rows[0]] = (99, 77)  # the store says another size than the file's header
    ld = RelabelLoader(root, files, [0] * len(files), sizes, steps_of=lambda e: plan, stored_step=len(SHAPES),
                       mix="cutmix", batch_size=len(SHAPES), crop_size=S, device=DEVICE, num_threads=1)
    ld.set_epoch(0)
    with pytest.raises(LoaderError, match=files[plan.rows[0]]):
        list(ld)


def test_a_stored_crop_that_rounds_to_no_pixel_is_refused_by_name(folder):
    from pipelines import LoaderError
    root, files = folder
    plan = plan_of(len(SHAPES), "none", seed=9)
    plan.coords[0] = (0.5, 0.5, 1e-4, 0.5)  # valid in [0, 1], but under half a pixel high
    ld = loader_for(folder, plan, "none", len(SHAPES))
    ld.set_epoch(0)
    with pytest.raises(LoaderError, match=files[plan.rows[0]] + r": its stored crop is 0x\d+ px"):
        list(ld)
