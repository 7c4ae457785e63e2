"""Training: options (:mod:`.config`), data order (:mod:`.sampler`), DDP (:mod:`.distributed`), the loop
(:mod:`.loop`), the resume checkpoint (:mod:`.checkpoint`), the schedule (:mod:`.schedule`), ``train()``
(:mod:`.train`) and the analysis's copy fine-tuning (:mod:`.finetune`)."""

from .config import TrainConfig, resolve_config, split_from_recommendation
from .finetune import finetune_backbone
from .sampler import StepBatches, epoch_permutation
from .train import build_model, train

__all__ = [
    "StepBatches",
    "TrainConfig",
    "build_model",
    "epoch_permutation",
    "finetune_backbone",
    "resolve_config",
    "split_from_recommendation",
    "train",
]
