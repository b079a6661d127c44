"""Command line: ``lightning-ext`` / ``lightning`` / ``python -m lightning_ext``.

All three are a :class:`lightning.pytorch.cli.LightningCLI` in subclass mode (model and data
chosen by ``class_path``), with OmegaConf interpolation in YAML (``${model.init_args.x}``).

``lightning``: Lightning 2.6 ships no ``lightning`` command, but the ``lightning-sdk`` package
does, and pip silently overwrites one console script with the other (the one installed last
wins). Our ``lightning`` therefore runs fit / validate / test / predict itself and hands any
other subcommand to lightning-sdk's command when that package is installed. If lightning-sdk
was installed after this package, its script replaced ours: use ``lightning-ext`` (always ours).

What the CLI adds to LightningCLI: ``--help`` names the suite's callbacks, optimizers and strategies; the training
bar counts steps out of ``max_steps`` (:class:`lightning_ext.progress.StepProgressBar`, unless the config names a
progress bar); messages from other libraries that the user cannot act on are filtered (:mod:`._quiet`); after
``fit`` it draws the run's metrics (:mod:`lightning_ext.plot`) and its last line says where the checkpoint, the
logs and the picture are. ``lightning-ext plot RUN_DIR`` draws a run again.
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_only

SUBCOMMANDS = ("fit", "validate", "test", "predict")


def suite_help() -> str:
    """The paragraph ``--help`` ends with: what this suite adds, by the names a YAML uses."""
    import lightning_ext.callbacks as callbacks
    import lightning_ext.optimizers as optimizers

    techniques = ", ".join(n for n in callbacks.__all__ if n != "Technique")
    return (f"lightning_ext callbacks (trainer.callbacks, class_path lightning_ext.callbacks.NAME): {techniques}. "
            f"Optimizers (optimizer, class_path lightning_ext.optimizers.NAME): {', '.join(optimizers.__all__)}; "
            "LAWN and CrAM wrap a base optimizer in YAML as lightning_ext.optimizers.cli.LAWN / .CrAM. "
            "Strategies (trainer.strategy): deepspeed_cpu, deepspeed_cpu_stage_1, _2, _3 (DeepSpeed ZeRO on CPU). "
            "Show one class's arguments with e.g. --trainer.callbacks.help lightning_ext.callbacks.LoRA. "
            "lightning-ext plot RUN_DIR draws a run's metrics.csv to a PNG.")


class LightningExtCLI(LightningCLI):
    """LightningCLI with OmegaConf interpolation, subclass mode, and the checkpoint manifest guard."""

    def __init__(self, *args, **kwargs) -> None:
        from lightning_ext._quiet import quiet_outside_noise

        quiet_outside_noise()
        kwargs.setdefault("parser_kwargs", {"parser_mode": "omegaconf"})
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("auto_configure_optimizers", True)
        super().__init__(*args, **kwargs)

    def init_parser(self, **kwargs):
        kwargs.setdefault("epilog", suite_help())
        return super().init_parser(**kwargs)

    def _instantiate_trainer(self, config: dict, callbacks: list):
        configured = config.get("callbacks") or []
        configured = configured if isinstance(configured, list) else [configured]
        from lightning_ext.callbacks.optimizer_diagnostics import OptimizerDiagnostics

        callbacks = [*callbacks, OptimizerDiagnostics()]  # a YAML optimizer: section's LAWN/CrAM logs through it
        if config.get("enable_progress_bar", True) is not False and not any(
                isinstance(c, ProgressBar) for c in [*configured, *callbacks]):
            from lightning_ext.progress import StepProgressBar

            callbacks = [*callbacks, StepProgressBar()]
        return super()._instantiate_trainer(config, callbacks)

    def before_instantiate_classes(self) -> None:
        # make our strategies (e.g. "deepspeed_cpu_stage_2") resolvable by name from YAML
        import lightning_ext.strategies  # noqa: F401

    def before_fit(self) -> None:
        from lightning_ext.callbacks.manifest import ensure_manifest
        from lightning_ext.callbacks.nonfinite import ensure_guard
        from lightning_ext.manifest import check_manifest

        check_manifest(self.trainer, self.config_init[self.subcommand].get("ckpt_path"))
        ensure_manifest(self.trainer)  # every run's checkpoints record its optimizer stack
        ensure_guard(self.trainer)  # non-finite steps skipped, unless a NonFiniteGuard(enabled=False) is there

    def after_fit(self) -> None:
        # trainer.log_dir broadcasts from rank 0: every rank asks, only rank 0 reports
        report_run(self.trainer, self.trainer.log_dir if self.trainer.loggers else None)


@rank_zero_only
def report_run(trainer, log_dir: str | None) -> None:
    """Draw the run's metrics and print, as the last line, where the checkpoint, the logs and the picture are."""
    parts = []
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None and (checkpoint.best_model_path or checkpoint.last_model_path):
        parts.append(f"checkpoint: {checkpoint.best_model_path or checkpoint.last_model_path}")
    if log_dir is not None:
        parts.append(f"logs: {log_dir}")
        if (Path(log_dir) / "metrics.csv").is_file():
            try:
                parts.append(f"picture: {plot_main([log_dir], quiet=True)}")
            except ImportError:
                parts.append("picture: pip install 'lightning-ext[plot]', then lightning-ext plot " + str(log_dir))
    if parts:
        print("lightning-ext: " + " | ".join(parts), flush=True)


def plot_main(argv: list[str], quiet: bool = False) -> Path:
    """``lightning-ext plot RUN_DIR [--out FILE]``."""
    import argparse

    from lightning_ext.plot import plot_run

    parser = argparse.ArgumentParser(prog="lightning-ext plot", description="Draw a run's metrics.csv (CSVLogger) "
                                     "to a PNG: training loss, validation metrics, each technique's diagnostics.")
    parser.add_argument("run_dir", help="a version_N folder, or the folder above them (the newest is drawn)")
    parser.add_argument("--out", default=None, help="where to write the PNG (default: metrics.png beside the CSV)")
    parser.add_argument("--all", action="store_true", help="draw every version_N as one run (a run and its "
                        "resumptions: each resumed fit logs into the next version)")
    args = parser.parse_args(argv)
    out = plot_run(args.run_dir, args.out, all_versions=args.all)
    if not quiet:
        print(out)
    return out


def main(args: list[str] | None = None) -> None:
    """``lightning-ext`` and ``python -m lightning_ext``."""
    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] == "plot":
        try:
            plot_main(argv[1:])
        except (FileNotFoundError, ValueError, ImportError) as err:
            sys.exit(f"lightning-ext plot: {err}")
        return
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
    from_command_line = argv is None
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in SUBCOMMANDS or argv[0] == "plot" or argv[0].startswith("-"):
        # from the command line LightningCLI reads sys.argv itself (passing it again as args makes it warn)
        main(None if from_command_line else argv)
        return
    ep = _sdk_entry_point()
    if ep is None:
        sys.exit(f"lightning: '{argv[0]}' is not a subcommand of lightning-ext (which handles "
                 f"{', '.join(SUBCOMMANDS)}), and the lightning-sdk package that provides the other `lightning` "
                 "subcommands is not installed. Run `lightning-ext --help` for what lightning-ext does.")
    sys.argv = ["lightning", *argv]
    sys.exit(ep.load()())
