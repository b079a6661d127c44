"""Lightning glue: one callback per technique (thin; the math lives in optimizers/ and nn/)."""

from lightning_ext.callbacks.adapters import EVA, Bone, GoRA, LoRA, LoTR
from lightning_ext.callbacks.base import Technique
from lightning_ext.callbacks.clnp import CLNP
from lightning_ext.callbacks.compander import WeightCompander
from lightning_ext.callbacks.cram import CrAM
from lightning_ext.callbacks.lawn import LAWN
from lightning_ext.callbacks.manifest import LoadWeights, Manifest
from lightning_ext.callbacks.nonfinite import NonFiniteGuard
from lightning_ext.callbacks.onebit import OneBit
from lightning_ext.callbacks.quest import QuEST
from lightning_ext.callbacks.reweighting import LossReweighting

__all__ = ["CLNP", "EVA", "LAWN", "Bone", "CrAM", "GoRA", "LoRA", "LoTR", "LoadWeights", "LossReweighting",
           "Manifest", "NonFiniteGuard", "OneBit", "QuEST", "Technique", "WeightCompander"]
