"""A faithful re-creation of FKD's own training loader (szq0214/FKD ``utils_FKD.py`` + ``train_FKD.py``),
the baseline of ``fkd-dali bench loader``.

Per sample, in a torch ``DataLoader`` worker: ``torch.load`` the image's label file
(``<softlabel_path>/<class>/<stem>.tar``), ``torch.randperm`` over its crops, PIL-decode the JPEG once,
and for each of ``num_crops`` chosen crops ``resized_crop`` (bilinear) + ``hflip`` if flagged +
``ToTensor`` + ``Normalize``. The default collate then yields lists per crop, concatenated crop-major
with ``torch.cat`` as ``train_FKD.py`` does. Written from FKD's published semantics, not copied.
"""

from __future__ import annotations

import os

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..fkd_format import label_stem

MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


class FKDOriginalDataset(Dataset):
    def __init__(self, root: str, files: list[str], targets: list[int], softlabel_path: str, num_crops: int,
                 size: int = 224):
        self.root, self.files, self.targets = root, files, targets
        self.softlabel_path, self.num_crops, self.size = softlabel_path, num_crops, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        rel = self.files[index]
        # FKD stored numpy arrays and loaded them with torch<2.6, i.e. weights_only=False.
        coords, flip_status, output = torch.load(os.path.join(self.softlabel_path, label_stem(rel) + ".tar"),
                                                 map_location="cpu", weights_only=False)
        rand_index = torch.randperm(len(output))
        with open(os.path.join(self.root, rel), "rb") as f:
            img = Image.open(f).convert("RGB")
        W, H = img.size
        samples, hard, soft = [], [], []
        for i in range(self.num_crops):
            j = int(rand_index[i])
            c = coords[j]
            crop = TF.resized_crop(img, float(c[0]) * H, float(c[1]) * W, float(c[2]) * H, float(c[3]) * W,
                                   [self.size, self.size], TF.InterpolationMode.BILINEAR)
            if flip_status[j]:
                crop = TF.hflip(crop)
            samples.append(TF.normalize(TF.to_tensor(crop), MEAN, STD))
            hard.append(self.targets[index])
            soft.append(torch.as_tensor(output[j]))
        return samples, hard, soft


def fkd_original_loader(root: str, files: list[str], targets: list[int], softlabel_path: str, *,
                        batch_size: int, num_crops: int, workers: int, size: int = 224,
                        pin_memory: bool = False) -> DataLoader:
    ds = FKDOriginalDataset(root, files, targets, softlabel_path, num_crops, size)
    return DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers, pin_memory=pin_memory,
                      persistent_workers=workers > 0, drop_last=False)


def iterate(loader: DataLoader):
    """Yield (images (B*n, 3, S, S), soft labels, hard targets) as ``train_FKD.py`` assembles them."""
    for images, target, soft_label in loader:
        yield torch.cat(images, dim=0), torch.cat(soft_label, dim=0), torch.cat(target, dim=0)
