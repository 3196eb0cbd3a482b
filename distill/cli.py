"""``distill fit|validate|test|predict --config ...``: LightningCLI with the project's defaults.

- The DataModule's ``num_classes``, ``in_chans`` and ``image_size`` are linked into the model.
- Runs live under ``runs/<name>/version_<n>/`` (CSV metrics, ``checkpoints/last.ckpt`` and the best
  by ``val/top1``); ``--ckpt_path runs/.../last.ckpt`` resumes.
- The checkpoint callback is a fixed argument group (``--checkpoint.*``), so a ``callbacks`` list
  given on the command line cannot drop it (DESIGN.md: CLI lists replace YAML lists).
"""
from __future__ import annotations

from pathlib import Path

from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningCLI

from .data.base import ClassificationDataModule
from .methods.base import DistillModule

LINKED = ("num_classes", "in_chans", "image_size")


def default_run_name(config) -> str:
    """``<dataset>/<method>/<networks>`` from the resolved config, e.g. ``cifar100/offlinekd/resnet32x4-resnet8x4``."""
    dataset = config.data.class_path.rsplit(".", 1)[-1].removesuffix("DataModule").lower()
    method = config.model.class_path.rsplit(".", 1)[-1].lower()
    args = config.model.init_args
    nets = [args.get(key) for key in ("model", "teacher", "student", "peer") if args.get(key)]
    return "/".join([dataset, method, "-".join(nets)])


def resumed_version(ckpt_path: str | None) -> str | None:
    """``version_<n>`` when resuming from a checkpoint inside a run directory, else ``None``."""
    if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry"):
        return None
    parent = Path(ckpt_path).resolve().parent
    return parent.parent.name if parent.name == "checkpoints" and parent.parent.name.startswith("version_") else None


class DistillCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        for key in LINKED:
            parser.link_arguments(f"data.{key}", f"model.init_args.{key}", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/top1",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-epoch{epoch:03d}",
                "checkpoint.auto_insert_metric_name": False,
                "trainer.default_root_dir": "runs",
                "trainer.logger": {
                    "class_path": "pytorch_lightning.loggers.CSVLogger",
                    "init_args": {"save_dir": "runs", "name": None},
                },
            }
        )

    def before_instantiate_classes(self) -> None:
        """Name unnamed runs after their dataset, method and networks (a predictable run directory);
        ``fit --ckpt_path runs/<name>/version_<n>/checkpoints/x.ckpt`` continues in that version."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        resumed = resumed_version(config.get("ckpt_path")) if self.subcommand == "fit" else None
        loggers = config.trainer.logger
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            init_args = getattr(logger, "init_args", None)
            if init_args is None:
                continue
            if "name" in init_args and not init_args.name:
                init_args.name = default_run_name(config)
            if resumed is not None and "version" in init_args and init_args.version is None:
                init_args.version = resumed


def build_cli(args: list[str] | None = None, run: bool = True) -> DistillCLI:
    """The CLI object (``run=False`` parses and instantiates without running a subcommand)."""
    return DistillCLI(
        DistillModule,
        ClassificationDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        args=args,
        run=run,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},  # a resumed fit continues in its run directory
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``distill`` console script; ``main(args=[...])`` from tests."""
    build_cli(args)


if __name__ == "__main__":
    main()
