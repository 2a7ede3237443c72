"""DALI pipelines of fkd-dali: graphs, the external-source readers and the loaders. No training code."""

from .dali_install import DaliInstallError, import_dali

import_dali()  # a missing or doubled DALI says how to fix it, before any `import nvidia.dali` below fails

from .errors import LoaderError  # noqa: E402
from .graphs import (IMAGENET_MEAN, IMAGENET_STD, DecoderOptions, center_crop, decode,  # noqa: E402
                     eval_pipeline, fkd_crops, fkd_pipeline, generation_pipeline, random_resized_crop,
                     replay_crops, roi_of, standard_pipeline, to_model_input)
from .loader import EvalLoader, FKDLoader, StandardLoader  # noqa: E402
from .reader import (EpochPlan, FKDReader, GenerationReader, ImagePaths, ImageReader, RoundReads,  # noqa: E402
                     roi_from_boxes, round_for_pass, shard_positions)

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "DaliInstallError", "DecoderOptions", "EpochPlan", "EvalLoader", "FKDLoader",
    "FKDReader", "GenerationReader", "ImagePaths", "ImageReader", "LoaderError", "RoundReads", "StandardLoader",
    "center_crop", "decode", "eval_pipeline", "fkd_crops", "fkd_pipeline", "generation_pipeline", "random_resized_crop",
    "replay_crops", "roi_from_boxes", "roi_of", "round_for_pass", "shard_positions", "standard_pipeline",
    "to_model_input",
]
