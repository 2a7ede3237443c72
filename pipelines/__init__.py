"""DALI pipelines of fkd-dali: graphs, the external-source readers and the loaders. No training code."""

from .errors import LoaderError
from .graphs import (IMAGENET_MEAN, IMAGENET_STD, center_crop, decode, eval_pipeline, fkd_crops, fkd_pipeline,
                     generation_pipeline, random_resized_crop, replay_crops, roi_of, standard_pipeline,
                     to_model_input)
from .loader import EvalLoader, FKDLoader, StandardLoader
from .reader import (EpochPlan, FKDReader, GenerationReader, ImageReader, ImagePaths, roi_from_boxes, round_for_pass,
                     shard_positions)

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "EpochPlan", "EvalLoader", "FKDLoader", "FKDReader", "GenerationReader",
    "ImageReader",
    "LoaderError", "StandardLoader", "center_crop", "decode", "ImagePaths", "eval_pipeline", "fkd_crops",
    "fkd_pipeline", "generation_pipeline", "random_resized_crop", "replay_crops", "roi_from_boxes", "roi_of",
    "round_for_pass", "shard_positions", "standard_pipeline", "to_model_input",
]
