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
  so a ``callbacks`` list given on the command line cannot drop them (CLI lists replace YAML lists).
  ``last`` is its own callback because Lightning's ``save_last`` only writes when the monitored metric
  improved.
- ``--preemption.*`` (on by default): on SIGTERM or SIGUSR1 the fit checkpoints ``last.ckpt`` at the end
  of the current step and stops; resuming from it is exact (``distill.callbacks.preemption``).
- The progress bar, where it is on and no ``ProgressBar`` callback is given, refreshes every
  :data:`PROGRESS_REFRESH_STEPS` steps ([chosen]: refreshing every step, Lightning's default, cost 0.49 ms
  a step at batch 4 on a 2-core CPU, every 10 steps 0.16, ``benchmarks/step_pairs.py --variant``).
  ``TQDM_MINITERS`` raises it; ``--trainer.callbacks+=TQDMProgressBar`` takes any rate.
- ``--stages.*``: the stage plan of every fit (:class:`~distill.callbacks.stages.StagePlan`): the epochs
  of each stage the method declares and the LR within it; one field at a time from any config file.

What is checked before anything is written, and what a failure leaves:

- ``--config`` files must exist and be valid YAML (the error names the file, line and column).
- ``--ckpt_path`` must be a readable checkpoint, and the run's arguments may differ from the
  checkpoint's only where :data:`distill.resume.MAY_CHANGE` allows (:mod:`distill.resume`); the
  teacher file must be the one the checkpoint was trained with (SHA-256).
- Every logger's ``save_dir`` must be writable.
- Arguments are checked by their constructors (:mod:`distill.checks`); data are read when the fit
  sets up. A start that fails before it has results (no checkpoint, no metric row) leaves no run
  directory behind, so it uses up no ``version_<n>``.
- Each segment of a run keeps its config (``config.yaml``, then ``config.resume-<n>.yaml``), written
  when training starts (:mod:`distill.callbacks.run_config`).

Errors the user can fix (:mod:`distill.errors`) print one line, without a traceback (``--debug`` or
``DISTILL_DEBUG=1`` shows it); any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from jsonargparse import ArgumentError
from pytorch_lightning.callbacks import ModelCheckpoint, ProgressBar, TQDMProgressBar
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.loggers import CSVLogger

from .callbacks.best_checkpoint import BestCheckpoint
from .callbacks.partial_epoch import PartialEpochMarker
from .callbacks.preemption import PreemptionCheckpoint
from .callbacks.run_config import RunConfig
from .callbacks.run_summary import RunSummary
from .callbacks.stages import StagePlan
from .data.base import ClassificationDataModule
from .errors import BadFileError, MissingFileError, find_user_error
from .methods.base import DistillModule
from .methods.card import method_class
from .models.weights import load_checkpoint
from .resume import check_resume, check_teacher
from .run_dirs import created_dirs, remove_failed_start

LINKED = ("num_classes", "in_chans", "image_size")
SUBCOMMANDS = ("fit", "validate", "test", "predict")
PROGRESS_REFRESH_STEPS = 10
LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")  # --ckpt_path values Lightning resolves itself
DEBUG_FLAG = "--debug"

HELP = """\
distill: knowledge distillation on PyTorch Lightning: KD, FitNet, AT, CRD, DKD, ReviewKD and the
other reference-benchmark losses, DML, and the PWKD, SOKD, SSKD and KR paradigms, on CIFAR-100,
ImageNet, Fashion-MNIST and the digits.

usage: distill <command> [--config FILE ...] [--<section>.<key>=VALUE ...] [--debug]

commands:
  fit       train a run (a teacher, a student, or a teacher -> student pair with a method) or resume one
  validate  evaluate a checkpoint once on the validation split
  test      evaluate a checkpoint once on the test split
  predict   Lightning's prediction loop (the bundled DataModules define no prediction split)
  export    write a trained network as .pt, .safetensors, TorchScript and ONNX
  cache-teacher  store a frozen teacher's logits for a run's batches, read by logit-only methods

`distill <command> --help` lists a command's arguments; `distill fit ... --print_config` prints the
resolved config. Errors print one line; --debug (or DISTILL_DEBUG=1) adds the traceback.

examples:
  distill fit --config lightning_configs/cifar100/supervised/resnet32x4.yaml
  distill fit --config lightning_configs/cifar100/pairs/resnet32x4_resnet8x4.yaml \\
              --config lightning_configs/methods/kd.yaml
  distill fit --config ... --ckpt_path runs/<name>/version_<n>/checkpoints/last.ckpt
  distill export runs/<name>/version_<n>/checkpoints/last.ckpt --out export/

documentation: docs/index.md in the repository (README.md: a tour and the results)
"""


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
    if not ckpt_path or ckpt_path in LIGHTNING_CKPT_NAMES:
        return None
    version_dir = Path(ckpt_path).resolve().parent.parent
    if Path(ckpt_path).resolve().parent.name != "checkpoints" or not version_dir.name.startswith("version_"):
        return None
    try:
        name = version_dir.parent.relative_to(Path(save_dir).resolve())
    except ValueError:
        return None
    return str(name), version_dir.name


def _loggers(config) -> list:
    loggers = config.trainer.logger
    return [logger for logger in (loggers if isinstance(loggers, list) else [loggers]) if logger]


def _is_mapping(text: str) -> bool:
    try:
        return isinstance(yaml.safe_load(text), dict)
    except yaml.YAMLError:
        return False


def check_config_files(argv: list[str]) -> None:
    """Every ``--config`` file, and the YAML files it names for a section (``trainer: trainer.yaml``), exists
    and parses; the error names the file, line and column (jsonargparse's says ``"<unicode string>"``). A
    ``--config`` value that is a YAML mapping itself (``--config '{trainer: {max_epochs: 1}}'``) is left to
    jsonargparse."""
    paths = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--config", "-c")]
    paths += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    pending, seen = [Path(p) for p in paths], set()
    paths_given = set(pending)
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        if not path.is_file():
            if path in paths_given and _is_mapping(str(path)):
                continue
            raise MissingFileError(f"--config {path}: no such file (a path relative to {Path.cwd()})")
        try:
            content = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise BadFileError(f"{path}: not valid YAML{where} ({problem}); fix the syntax there") from error
        if isinstance(content, dict):
            names = [v for v in content.values() if isinstance(v, str) and v.endswith((".yaml", ".yml"))]
            pending += [path.parent / name for name in names if (path.parent / name).is_file()]


def check_writable(directory: str | Path, key: str) -> None:
    """``directory`` exists or can be created, and a file can be written in it."""
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        raise BadFileError(
            f"{key}={str(directory)!r}: cannot write there ({error.strerror or error}); choose a writable "
            f"directory, e.g. --{key}=$HOME/runs"
        ) from error


def release_process_group() -> None:
    """Destroy the default process group a DDP run initialised, on this rank, once the run is over.

    Lightning destroys it at exit for NCCL only. A gloo group left alive is torn down during the
    interpreter's finalisation, where its worker threads may still hold tensors: now and then the
    process then aborts with ``terminate called without an active exception`` after the run finished
    (a flaky two-process test, or a SLURM job marked failed). Destroying it here joins its threads
    while Python is fully alive. It is a local operation, not a collective: ranks need not wait for
    each other.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


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

    def instantiate_trainer(self, **kwargs):
        """Lightning's, with the default progress bar refreshing every :data:`PROGRESS_REFRESH_STEPS` steps."""
        trainer = self._get(self.config_init, "trainer", default={})
        given = trainer.get("callbacks") or []
        given = given if isinstance(given, list) else [given]
        if trainer.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in given):
            bar = TQDMProgressBar(refresh_rate=PROGRESS_REFRESH_STEPS)
            self.trainer_defaults = {**self.trainer_defaults, "callbacks": [*self.trainer_defaults["callbacks"], bar]}
        return super().instantiate_trainer(**kwargs)

    def _parse_ckpt_path(self) -> None:
        """Lightning's version replaces the model's arguments with the checkpoint's hyper-parameters,
        silently dropping what was typed; :meth:`check_checkpoint` refuses a difference instead."""

    def before_instantiate_classes(self) -> None:
        """Name unnamed runs after their dataset, method and networks (a predictable run directory);
        ``fit --ckpt_path runs/<name>/version_<n>/checkpoints/x.ckpt`` continues in that version. Then check
        the checkpoint, before anything is instantiated or written."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        for logger in _loggers(config):
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
        self._resume_checkpoint = self.check_checkpoint(config)

    def checkpoint_file(self, config) -> Path | None:
        """The file ``--ckpt_path`` resumes from: the path given, or for ``last`` the ``last.ckpt`` of the
        run directory the logger names (``--trainer.logger.init_args.version`` set); ``None`` without one."""
        ckpt_path = config.get("ckpt_path")
        if not ckpt_path or "://" in str(ckpt_path):
            return None
        if ckpt_path not in LIGHTNING_CKPT_NAMES:
            if not Path(ckpt_path).is_file():
                raise MissingFileError(
                    f"--ckpt_path {ckpt_path}: no such file; give a checkpoint a fit wrote "
                    "(runs/<name>/version_<n>/checkpoints/last.ckpt), or leave --ckpt_path out to start a new run"
                )
            return Path(ckpt_path)
        for logger in _loggers(config) if ckpt_path == "last" else []:
            args = getattr(logger, "init_args", None) or {}
            if args.get("version") is not None and args.get("name"):
                version = str(args["version"])
                version = version if version.startswith("version_") else f"version_{version}"
                last = Path(args.get("save_dir") or ".") / args["name"] / version / "checkpoints/last.ckpt"
                return last if last.is_file() else None
        return None

    def check_checkpoint(self, config) -> dict | None:
        """Read the checkpoint (a clear error if it cannot be) and refuse arguments it may not run with."""
        path = self.checkpoint_file(config) if self.subcommand else None
        if path is None:
            return None
        checkpoint = load_checkpoint(path, mmap=True)
        resolved = yaml.safe_load(self._parser(self.subcommand).dump(config, skip_none=False))
        check_resume(path, checkpoint, resolved, self.subcommand)
        self._resume_path = path
        return checkpoint

    def instantiate_classes(self) -> None:
        """As Lightning's, except that an error a constructor raised for a bad argument (:mod:`distill.errors`)
        comes out as itself, not inside jsonargparse's error about every type it tried."""
        try:
            super().instantiate_classes()
        except Exception as error:
            user_error = find_user_error(error)
            if user_error is None or user_error is error:
                raise
            raise user_error from None

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        if getattr(self, "_resume_checkpoint", None) is not None:
            check_teacher(self._resume_path, self._resume_checkpoint, getattr(self.model, "teacher_info", None))
            self._resume_checkpoint = None  # memory-mapped: let it go before the fit loads it again

    def _run_subcommand(self, subcommand: str) -> None:
        """Check that the loggers can write, run, and remove the run directory of a start that failed before
        it had results (a data error, a refused checkpoint state), so it uses up no version."""
        loggers = self.trainer.loggers
        created = [created_dirs(logger.log_dir) for logger in loggers if isinstance(logger, CSVLogger)]
        for logger in loggers:
            if getattr(logger, "save_dir", None):
                check_writable(logger.save_dir, "trainer.logger.init_args.save_dir")
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            if self.trainer.is_global_zero:
                for dirs in created:
                    remove_failed_start(dirs)
            raise
        finally:
            release_process_group()


def build_cli(args: list[str] | None = None, run: bool = True) -> DistillCLI:
    """The CLI object (``run=False`` parses and instantiates without running a subcommand). Errors are
    raised; :func:`main` presents them."""
    return DistillCLI(
        DistillModule,
        ClassificationDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        args=args,
        run=run,
        auto_configure_optimizers=False,
        save_config_callback=RunConfig,
        trainer_defaults={"callbacks": [PartialEpochMarker()]},
        parser_kwargs={"exit_on_error": False, **{name: {"exit_on_error": False} for name in SUBCOMMANDS}},
    )


def argument_problem(error: BaseException) -> str:
    """jsonargparse's error as one line, ``<dotted key>: <innermost problem>``, read from the chain of
    errors it raised from; its whole text where that chain is not recognised."""
    keys, node, innermost = [], error, error
    while node is not None:
        first = (str(node).strip().splitlines() or [""])[0]
        key = re.match(r'Parser key "([^"]+)":', first)
        if key and key.group(1) not in keys[-1:]:
            keys.append(key.group(1))
        elif first.startswith("Problem with given class_path") and keys[-1:] != ["init_args"]:
            keys.append("init_args")
        innermost, node = node, node.__cause__ or node.__context__
    problem = (str(innermost).strip().splitlines() or [""])[0]
    if not keys or not problem or problem.startswith(("Parser key", "Problem with", "Does not validate")):
        return str(error).strip()
    return f"{'.'.join(keys)}: {problem}"


def _report(message: str, hint: str, status: int) -> None:
    print(f"distill: error: {message} ({hint})", file=sys.stderr)
    raise SystemExit(status)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``distill`` console script; ``main(args=[...])`` from tests.

    ``distill export`` goes to :mod:`distill.tools.export`, ``distill cache-teacher`` to
    :mod:`distill.tools.cache_teacher` (LightningCLI's subcommands are fixed). A user
    error (:mod:`distill.errors`, also when Lightning or jsonargparse wrapped it) or a malformed argument
    prints one line and exits with status 1 (2 for a malformed argument); ``--debug`` or
    ``DISTILL_DEBUG=1`` raises it instead, with its traceback.
    """
    argv = list(sys.argv[1:] if args is None else args)
    if DEBUG_FLAG in argv:
        os.environ["DISTILL_DEBUG"] = "1"  # also for the DDP processes Lightning starts with this command line
        argv = [a for a in argv if a != DEBUG_FLAG]
    debug = os.environ.get("DISTILL_DEBUG", "") not in ("", "0")
    if not argv or argv[0] in ("-h", "--help"):
        print(HELP, end="", file=sys.stdout if argv else sys.stderr)
        if not argv:
            raise SystemExit(2)
        return None
    command = argv[0] if argv[0] in (*SUBCOMMANDS, "export", "cache-teacher") else "<command>"
    try:
        if command == "export":
            from .tools.export import main as export

            return export(argv[1:])
        if command == "cache-teacher":
            from .tools.cache_teacher import main as cache_teacher

            return cache_teacher(argv[1:])
        check_config_files(argv)
        build_cli(None if args is None and argv == sys.argv[1:] else argv)
    except ArgumentError as error:
        if debug:
            raise
        _report(argument_problem(error), f"`distill {command} --help` lists them", 2)
    except Exception as error:
        user_error = find_user_error(error)
        if user_error is None or debug:
            raise
        _report(str(user_error), "--debug shows the traceback", 1)


if __name__ == "__main__":
    main()
