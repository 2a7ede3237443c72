"""Run SRe2L's own scripts unchanged, with the patch its README asks for applied in this process.

    python tests/sre2l_run.py SRE2L_DIR [train_FKD.py's arguments ...]
    python tests/sre2l_run.py SRE2L_DIR --script relabel/generate_soft_label.py [its arguments ...]

SRE2L_DIR is the ``SRe2L`` folder of a checkout of VILA-Lab/SRe2L (holding ``validate/`` and ``relabel/``);
nothing of it is copied into this repository and the installed torch is never modified. In this process only:

* torch's ``_MapDatasetFetcher.fetch`` is replaced by the README's "Modified code" (SRe2L/validate/README.md):
  a batch of an ``fkd_load`` dataset loads its batch file first and returns (batch, mix_index, mix_lam, mix_bbox,
  soft_label) -- what SRe2L#17 and G_VBSM#2 report training fails without;
* ``torch.load``'s default ``weights_only`` loader (torch >= 2.6) is allowed numpy's scalars, which SRe2L's files hold
  (CutMix's box is numpy int64s): without this, train_FKD.py cannot read SRe2L's own files on a current torch;
* with ``SRE2L_FETCH_LOG=FILE``, each fetched batch's epoch, images and labels' sum is appended to FILE;
* ``wandb`` is a stand-in whose calls do nothing when it is not installed (train_FKD.py logs to it);
* with ``SRE2L_RANDOM_TEACHER=1``, ``torchvision.models.<arch>(pretrained=True)`` builds the architecture with
  random weights (seeded 0): the machine has no network to download ImageNet weights, and the format is what is
  tested, not the teacher;
* with ``SRE2L_TEACHER=FILE`` (a state_dict saved by torch.save), ``torchvision.models.<arch>(pretrained=True)``
  builds the architecture and loads FILE (weights_only): a teacher trained on this machine (``bench relabel``);
* with ``SRE2L_SEED=N``, torch, numpy and random are seeded with N before the script runs (train_FKD.py has no
  ``--seed``: a student's initialisation is otherwise unseeded);
* with ``SRE2L_INPUT_SIZE=N``, the sizes train_FKD.py hard-codes become N: its training crop
  (``RandomResizedCropWithCoords(size=224)``) and validation ``Resize(256)`` / ``CenterCrop(224)`` (256 -> round(N *
  256 / 224)); everything else of its recipe is unchanged. A 2-core CPU cannot train at 224 px in a benchmark;
* on a machine without CUDA (our 2-core CI VM): ``.cuda()`` of tensors and modules returns them as they are,
  ``nn.DataParallel`` is the module itself, pin_memory is off and the script's "need gpu" check passes.
"""

from __future__ import annotations

import os
import runpy
import sys
import types


def patch_fetcher() -> None:
    from torch.utils.data._utils import fetch

    def fetch_batch(self, possibly_batched_index):  # SRe2L/validate/README.md, "Modified code"
        if hasattr(self.dataset, "mode") and self.dataset.mode == 'fkd_load':
            mix_index, mix_lam, mix_bbox, soft_label = self.dataset.load_batch_config(possibly_batched_index[0])
        if self.auto_collation:
            if hasattr(self.dataset, "__getitems__") and self.dataset.__getitems__:
                data = self.dataset.__getitems__(possibly_batched_index)
            else:
                data = [self.dataset[idx] for idx in possibly_batched_index]
        else:
            data = self.dataset[possibly_batched_index]
        if hasattr(self.dataset, "mode") and self.dataset.mode == 'fkd_load':
            _log(self.dataset.epoch, possibly_batched_index, soft_label)
            return self.collate_fn(data), mix_index.cpu(), mix_lam, mix_bbox, soft_label.cpu()
        return self.collate_fn(data)

    fetch._MapDatasetFetcher.fetch = fetch_batch


def _log(epoch, indices, soft_label) -> None:
    """With SRE2L_FETCH_LOG=FILE: one JSON line per batch the trainer fetched (epoch, its images, its labels' sum),
    so a test can check which labels SRe2L's trainer paired with which images (not part of the README's patch)."""
    path = os.environ.get("SRE2L_FETCH_LOG")
    if path:
        import json
        with open(path, "a") as f:
            f.write(json.dumps({"epoch": epoch, "images": [int(i) for i in indices],
                                "label_sum": float(soft_label.double().sum())}) + "\n")


def allow_numpy_scalars() -> None:
    import numpy as np
    import torch
    core = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    torch.serialization.add_safe_globals([core.scalar, np.dtype] + [type(np.dtype(t)) for t in
                                                                     (np.int64, np.float64, np.float32)])


def stand_in_wandb() -> None:
    try:
        import wandb  # noqa: F401
    except ImportError:
        sys.modules["wandb"] = types.SimpleNamespace(login=lambda **k: None, init=lambda **k: None,
                                                     log=lambda *a, **k: None, finish=lambda *a, **k: None)


def cpu_only(script: str) -> None:
    import torch
    import torch.utils.data
    if torch.cuda.is_available():
        return
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.nn.DataParallel = lambda module, *a, **k: module
    really = torch.cuda.is_available
    # True for the script's own "need gpu to train!" check only; torch itself still sees no GPU
    torch.cuda.is_available = lambda: sys._getframe(1).f_code.co_filename == script or really()
    init = torch.utils.data.DataLoader.__init__

    def no_pin(self, *a, **k):
        k["pin_memory"] = False
        init(self, *a, **k)
    torch.utils.data.DataLoader.__init__ = no_pin


def random_teacher() -> None:
    import torch
    import torchvision.models as models
    for name, build in list(vars(models).items()):
        if callable(build) and name.islower() and not name.startswith("_") and name != "get_model":
            def seeded(*a, _build=build, pretrained=False, **k):
                torch.manual_seed(0)
                return _build(*a, **k)
            setattr(models, name, seeded)


def loaded_teacher(path: str) -> None:
    import torch
    import torchvision.models as models
    state = torch.load(path, map_location="cpu", weights_only=True)
    for name, build in list(vars(models).items()):
        if callable(build) and name.islower() and not name.startswith("_") and name != "get_model":
            def loaded(*a, _build=build, pretrained=False, **k):
                model = _build(*a, **k)
                model.load_state_dict(state)
                return model
            setattr(models, name, loaded)


def seeded(seed: int) -> None:
    import random

    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def input_size(n: int) -> None:
    """train_FKD.py's hard-coded 224 px crops (and 256 px validation resize) become ``n`` (and n * 256 / 224)."""
    import torchvision.transforms as T
    sizes = {224: n, 256: round(n * 256 / 224)}
    for cls in (T.RandomResizedCrop, T.Resize, T.CenterCrop):
        init = cls.__init__

        def resized(self, *a, _init=init, **k):
            if a and a[0] in sizes:
                a = (sizes[a[0]],) + a[1:]
            if k.get("size") in sizes:
                k["size"] = sizes[k["size"]]
            _init(self, *a, **k)
        cls.__init__ = resized


def main(argv: list[str]) -> None:
    sre2l = os.path.abspath(argv[0])
    rel = "validate/train_FKD.py"
    args = argv[1:]
    if args[:1] == ["--script"]:
        rel, args = args[1], args[2:]
    script = os.path.join(sre2l, rel)
    if not os.path.isfile(script):
        sys.exit(f"{script} does not exist: give the SRe2L folder of a VILA-Lab/SRe2L checkout")
    here = os.path.dirname(script)
    os.chdir(here)  # train_FKD.py appends '..' to sys.path for relabel.utils_fkd
    sys.path[:0] = [here, sre2l]
    patch_fetcher()
    allow_numpy_scalars()
    stand_in_wandb()
    cpu_only(script)
    if os.environ.get("SRE2L_RANDOM_TEACHER") == "1":
        random_teacher()
    if os.environ.get("SRE2L_TEACHER"):
        loaded_teacher(os.environ["SRE2L_TEACHER"])
    if os.environ.get("SRE2L_INPUT_SIZE"):
        input_size(int(os.environ["SRE2L_INPUT_SIZE"]))
    if os.environ.get("SRE2L_SEED"):
        seeded(int(os.environ["SRE2L_SEED"]))
    sys.argv = [script] + args
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
