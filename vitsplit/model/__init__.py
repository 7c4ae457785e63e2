"""ViT-Split and its baselines: the model, heads, deformable block, multi-task wrapper, the published
configurations (:mod:`.configs`) and the trained-weights file (:mod:`.artefact`)."""

from .artefact import load_trainable, load_trained, read_trained, save_trained
from .baselines import Baseline
from .build import build_model, model_from_config
from .configs import METHODS, PUBLISHED, TASKS, default_k_t, default_split, prior_layers_uniform
from .multitask import MultiTaskViTSplit
from .vit_split import SplitHeads, ViTSplit, count_trainable

__all__ = [
    "Baseline",
    "METHODS",
    "MultiTaskViTSplit",
    "PUBLISHED",
    "SplitHeads",
    "TASKS",
    "ViTSplit",
    "build_model",
    "count_trainable",
    "default_k_t",
    "default_split",
    "load_trainable",
    "load_trained",
    "model_from_config",
    "prior_layers_uniform",
    "read_trained",
    "save_trained",
]
