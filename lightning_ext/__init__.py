"""lightning_ext: training-time techniques from the literature for PyTorch Lightning.

``lightning_ext.optimizers`` (pure torch optimizers and wrappers), ``lightning_ext.nn``
(modules and functions), ``lightning_ext.callbacks`` (thin Lightning glue), plus offline demo
``data``/``models``, ``surgery``, ``losses`` and the CLI.
"""

__version__ = "0.1.0"
