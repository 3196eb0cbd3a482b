"""``distill fit|validate|test|predict --config ...``: LightningCLI with the project's defaults.

- The DataModule's ``num_classes``, ``in_chans`` and ``image_size`` are linked into the model.
- Runs live under ``runs/<name>/version_<n>/`` (CSV metrics, ``checkpoints/last.ckpt`` written
  every epoch, and ``best-epoch<k>.ckpt`` by ``val/top1``); ``--ckpt_path runs/.../last.ckpt`` resumes
  in the same directory.
- Every fit logs its resolved config, teacher identity and student size to every logger and writes
  ``summary.json`` (last/best val top-1, run time) at its end (``--run_summary.*``, always on).
- ``distill export CKPT ...`` exports a trained network (:mod:`distill.tools.export`).
- ``distill cache-teacher --config ... --out DIR`` stores a teacher's logits for a sweep
  (:mod:`distill.tools.cache_teacher`).
- The two checkpoint callbacks are fixed argument groups (``--checkpoint.*``, ``--last_checkpoint.*``),
  so a ``callbacks`` list given on the command line cannot drop them (DESIGN.md: CLI lists replace
  YAML lists). ``last`` is its own callback because Lightning's ``save_last`` only writes when the
  monitored metric improved.
- ``--preemption.*`` (on by default): on SIGTERM or SIGUSR1 the fit checkpoints ``last.ckpt`` at the end
  of the current step and stops; resuming from it is exact (``distill.callbacks.preemption``).
- ``--stages.*``: the stage plan of every fit (:class:`~distill.callbacks.stages.StagePlan`): the epochs
  of each stage the method declares and the LR within it; one field at a time from any config file.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningCLI

from .callbacks.best_checkpoint import BestCheckpoint
from .callbacks.preemption import PreemptionCheckpoint
from .callbacks.run_summary import RunSummary
from .callbacks.stages import StagePlan
from .data.base import ClassificationDataModule
from .methods.base import DistillModule
from .methods.card import method_class

LINKED = ("num_classes", "in_chans", "image_size")


def default_run_name(config) -> str:
    """``<dataset>/<method>/<networks>`` from the resolved config, e.g. ``cifar100/offlinekd/resnet32x4-resnet8x4``;
    the networks are those the method's card names (:meth:`~distill.methods.base.DistillModule.card`), a
    ``/`` in a name (``timm/resnet50``) written as ``_``."""
    dataset = config.data.class_path.rsplit(".", 1)[-1].removesuffix("DataModule").lower()
    cls = method_class(config.model.class_path)
    networks = "-".join(cls.card(config.model.init_args).name_parts).replace("/", "_")  # timm/resnet50 -> timm_resnet50
    return "/".join([dataset, cls.__name__.lower(), networks])


def resumed_run(ckpt_path: str | None, save_dir: str) -> tuple[str, str] | None:
    """``(name, version)`` when resuming from ``<save_dir>/<name>/version_<n>/checkpoints/*.ckpt``."""
    if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry"):
        return None
    version_dir = Path(ckpt_path).resolve().parent.parent
    if Path(ckpt_path).resolve().parent.name != "checkpoints" or not version_dir.name.startswith("version_"):
        return None
    try:
        name = version_dir.parent.relative_to(Path(save_dir).resolve())
    except ValueError:
        return None
    return str(name), version_dir.name


class DistillCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        for key in LINKED:
            parser.link_arguments(f"data.{key}", f"model.init_args.{key}", apply_on="instantiate")
        parser.add_lightning_class_args(BestCheckpoint, "checkpoint")
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")
        parser.add_lightning_class_args(PreemptionCheckpoint, "preemption")
        parser.add_lightning_class_args(RunSummary, "run_summary")
        parser.add_lightning_class_args(StagePlan, "stages")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/top1",
                "checkpoint.mode": "max",
                "checkpoint.filename": "best-epoch{epoch:03d}",
                "checkpoint.auto_insert_metric_name": False,
                "last_checkpoint.filename": "last",
                "last_checkpoint.enable_version_counter": False,
                "trainer.default_root_dir": "runs",
                "trainer.logger": {
                    "class_path": "distill.loggers.ResumableCSVLogger",
                    "init_args": {"save_dir": "runs", "name": None},
                },
            }
        )

    def before_instantiate_classes(self) -> None:
        """Name unnamed runs after their dataset, method and networks (a predictable run directory);
        ``fit --ckpt_path runs/<name>/version_<n>/checkpoints/x.ckpt`` continues in that version."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        loggers = config.trainer.logger
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            init_args = getattr(logger, "init_args", None)
            if init_args is None or "name" not in init_args:
                continue
            resumed = None
            if self.subcommand == "fit" and init_args.get("version") is None:
                resumed = resumed_run(config.get("ckpt_path"), init_args.get("save_dir") or ".")
            if resumed and init_args.name in (None, resumed[0]):
                init_args.name, init_args.version = resumed
            elif not init_args.name:
                init_args.name = default_run_name(config)


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
    """Entry point of the ``distill`` console script; ``main(args=[...])`` from tests. ``distill export``
    goes to :mod:`distill.tools.export`, ``distill cache-teacher`` to :mod:`distill.tools.cache_teacher`
    (LightningCLI's subcommands are fixed)."""
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["export"]:
        from .tools.export import main as export

        return export(argv[1:])
    if argv[:1] == ["cache-teacher"]:
        from .tools.cache_teacher import main as cache_teacher

        return cache_teacher(argv[1:])
    build_cli(args)


if __name__ == "__main__":
    main()
