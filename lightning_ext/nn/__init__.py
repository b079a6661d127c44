"""Torch modules and functions used by the techniques (no Lightning import)."""

from lightning_ext.nn.pruning import (
    batchnorm_modules,
    frozen_batchnorm_stats,
    nm_mask,
    one_shot_prune,
    prunable_parameters,
    recalibrate_batchnorm,
    topk_masks,
)

__all__ = ["batchnorm_modules", "frozen_batchnorm_stats", "nm_mask", "one_shot_prune", "prunable_parameters",
           "recalibrate_batchnorm", "topk_masks"]
