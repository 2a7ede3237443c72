"""DALI pipelines of fkd-dali: graphs, the external-source readers and the loaders. No training code."""

from .dali_install import DaliInstallError, import_dali

import_dali()  # a missing or doubled DALI says how to fix it, before any `import nvidia.dali` below fails

from .errors import LoaderError  # noqa: E402
from .fkd_reader import FKDReader, roi_from_boxes  # noqa: E402
from .generation_reader import GenerationReader  # noqa: E402
from .graphs import (IMAGENET_MEAN, IMAGENET_STD, DecoderOptions, center_crop, decode,  # noqa: E402
                     eval_pipeline, fit_rois, fkd_crops, fkd_pipeline, generation_pipeline, random_resized_crop,
                     replay_crops, roi_of, standard_pipeline, to_model_input)
from .image_reader import ImagePaths, ImageReader  # noqa: E402
from .loader import EvalLoader, FKDLoader, FreshViewLoader, StandardLoader, check_loader_state  # noqa: E402
from .order import EpochPlan, round_for_pass, shard_positions  # noqa: E402
from .round_reads import RoundReads  # noqa: E402
from .view_reader import FreshViewReader  # noqa: E402

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "DaliInstallError", "DecoderOptions", "EpochPlan", "EvalLoader", "FKDLoader",
    "FKDReader", "FreshViewLoader", "FreshViewReader", "GenerationReader", "ImagePaths", "ImageReader", "LoaderError", "RoundReads", "StandardLoader",
    "center_crop", "check_loader_state", "decode", "eval_pipeline", "fit_rois", "fkd_crops", "fkd_pipeline", "generation_pipeline", "random_resized_crop",
    "replay_crops", "roi_from_boxes", "roi_of", "round_for_pass", "shard_positions", "standard_pipeline",
    "to_model_input",
]
