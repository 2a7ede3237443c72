"""Online (vanilla) knowledge distillation, what FKD saves: the same standard random-resized crops as the
hard-label baseline, and a teacher run on every crop of every step gives the soft labels (its softmax); the
loss is the soft cross-entropy of ``student / T``. The teacher sees the crops at its own input size
(``--teacher-input-size``: resized on the device) and runs in bf16 autocast where the student does."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..train_config import TrainError
from .base import DenseLabels, Run


class OnlineKD(DenseLabels):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.temperature = cfg.temperature
        self.teacher = None
        self.teacher_size = None

    def setup(self, run: Run) -> None:
        from ..teachers import TeacherSpec, build_teacher, output_classes  # noqa: PLC0415 - torchvision, lazily
        cfg = self.cfg
        if not cfg.teacher_arch:
            raise TrainError("--labels online needs --teacher-arch (and --teacher-path or --teacher-weights)")
        spec = TeacherSpec(cfg.teacher_arch, weights=cfg.teacher_weights, path=cfg.teacher_path,
                           input_size=cfg.teacher_input_size or cfg.input_size)
        teacher = build_teacher(spec, run.num_classes).to(run.torch_device)
        if run.channels_last:
            teacher = teacher.to(memory_format=torch.channels_last)
        got = output_classes(teacher, spec, run.torch_device)
        if got != run.num_classes:
            raise TrainError(f"teacher {cfg.teacher_arch} outputs {got} classes, the student {run.num_classes}")
        self.teacher, self.teacher_size = teacher, spec.input_size

    def targets(self, run: Run, batch: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        t_in = images if self.teacher_size == self.cfg.input_size else \
            F.interpolate(images.float(), size=self.teacher_size, mode="bilinear", antialias=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=run.amp):
            return torch.softmax(self.teacher(t_in).float(), dim=1)
