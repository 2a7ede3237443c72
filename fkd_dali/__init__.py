"""fkd-dali: Fast Knowledge Distillation (FKD) on NVIDIA DALI."""

__version__ = "0.1.0"
