"""torch.optim.Optimizer subclasses and optimizer wrappers (no Lightning import).

AdamW is torch's own (``torch.optim.AdamW``): name it in YAML as ``class_path: torch.optim.AdamW``.
"""

__all__: list[str] = []
