"""Command line: ``lightning-ext`` / ``lightning`` / ``python -m lightning_ext``.

All three are a :class:`lightning.pytorch.cli.LightningCLI` in subclass mode (model and data
chosen by ``class_path``), with OmegaConf interpolation in YAML (``${model.init_args.x}``).

``lightning``: Lightning 2.6 ships no ``lightning`` command, but the ``lightning-sdk`` package
does, and pip silently overwrites one console script with the other (the one installed last
wins). Our ``lightning`` therefore runs fit / validate / test / predict itself and hands any
other subcommand to lightning-sdk's command when that package is installed. If lightning-sdk
was installed after this package, its script replaced ours: use ``lightning-ext`` (always ours).
"""

from __future__ import annotations

import sys
from importlib import metadata

from lightning.pytorch.cli import LightningCLI

SUBCOMMANDS = ("fit", "validate", "test", "predict")


class LightningExtCLI(LightningCLI):
    """LightningCLI with OmegaConf interpolation, subclass mode, and the checkpoint manifest guard."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("parser_kwargs", {"parser_mode": "omegaconf"})
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("auto_configure_optimizers", True)
        super().__init__(*args, **kwargs)

    def before_instantiate_classes(self) -> None:
        # make our strategies (e.g. "deepspeed_cpu_stage_2") resolvable by name from YAML
        import lightning_ext.strategies  # noqa: F401

    def before_fit(self) -> None:
        from lightning_ext.manifest import check_manifest

        check_manifest(self.trainer, self.config_init[self.subcommand].get("ckpt_path"))


def main(args: list[str] | None = None) -> None:
    """``lightning-ext`` and ``python -m lightning_ext``."""
    try:
        LightningExtCLI(args=args)
    finally:
        _destroy_process_group()


def _destroy_process_group() -> None:
    # torch 2.13 + gloo can abort at interpreter exit ("terminate called without an active
    # exception") when the process group is still alive; Lightning's DDP teardown leaves it up.
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _sdk_entry_point():
    for dist_name in ("lightning-sdk", "lightning_sdk"):
        try:
            eps = metadata.distribution(dist_name).entry_points
        except metadata.PackageNotFoundError:
            continue
        for ep in eps:
            if ep.group == "console_scripts" and ep.name == "lightning":
                return ep
    return None


def lightning_main(argv: list[str] | None = None) -> None:
    """``lightning``: fit/validate/test/predict here; other subcommands go to lightning-sdk."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in SUBCOMMANDS or argv[0].startswith("-"):
        main(argv)
        return
    ep = _sdk_entry_point()
    if ep is None:
        sys.exit(f"lightning: '{argv[0]}' is not a subcommand of lightning-ext (which handles "
                 f"{', '.join(SUBCOMMANDS)}), and the lightning-sdk package that provides the other `lightning` "
                 "subcommands is not installed. Run `lightning-ext --help` for what lightning-ext does.")
    sys.argv = ["lightning", *argv]
    sys.exit(ep.load()())
