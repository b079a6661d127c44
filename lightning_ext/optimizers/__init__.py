"""torch.optim.Optimizer subclasses and optimizer wrappers (no Lightning import).

AdamW is torch's own (``torch.optim.AdamW``): name it in YAML as ``class_path: torch.optim.AdamW``.
"""

from lightning_ext.optimizers.adamp import SGDP, AdamP
from lightning_ext.optimizers.cram import CrAM
from lightning_ext.optimizers.fadam import FAdam
from lightning_ext.optimizers.lawn import LAWN

__all__ = ["LAWN", "AdamP", "CrAM", "FAdam", "SGDP"]
