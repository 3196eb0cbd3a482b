"""What may change when a run resumes from a checkpoint, and the check that refuses everything else.

Lightning's CLI, given ``--ckpt_path``, silently replaces the model's arguments with the checkpoint's
hyper-parameters, so an argument typed on the command line could be dropped without a word. ``distill``
instead compares the resumed run's resolved config with the one the checkpoint was trained with
(:data:`CONFIG_STATE_KEY` in the checkpoint, written by
:class:`~distill.callbacks.run_config.RunConfig`) and refuses any difference outside
:data:`MAY_CHANGE`, naming every differing argument; what may change is then applied. A checkpoint
written before the config was stored holds only the model's arguments (its ``hyper_parameters``),
and only those are compared.

Evaluation (``validate``/``test``/``predict`` with ``--ckpt_path``) compares the model's arguments
only: evaluating a trained network on other data or with another trainer is legitimate.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigError

CONFIG_STATE_KEY = "DistillRunConfig"  # the checkpoint's callbacks[...] entry holding the resolved config

# [chosen] Arguments that change how a run is executed or recorded, not what it computes. A key
# matches an entry equal to it or nested under it.
MAY_CHANGE = (
    "ckpt_path",
    "weights_only",
    "trainer.max_epochs",
    "trainer.max_steps",
    "trainer.max_time",
    "trainer.min_epochs",
    "trainer.min_steps",
    "trainer.logger",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
    "trainer.num_sanity_val_steps",
    "trainer.profiler",
    "trainer.default_root_dir",
    "trainer.accelerator",
    "model.init_args.teacher_weights",  # the file may move: its content is checked by SHA-256 (check_teacher)
    "model.init_args.stage_teacher_weights",
    "model.init_args.channels_last",
    "model.init_args.compile",
    "data.init_args.data_dir",
    "data.init_args.num_workers",
    "data.init_args.pin_memory",
    "data.init_args.download",
    "data.init_args.verify_md5",
    "preemption",
    "run_summary",
)
# Filled in from the data by the CLI (``link_arguments``), not typed.
LINKED = ("model.init_args.num_classes", "model.init_args.in_chans", "model.init_args.image_size")
CALLBACKS = "trainer.callbacks"


def may_change(key: str) -> bool:
    return any(key == allowed or key.startswith(f"{allowed}.") for allowed in MAY_CHANGE + LINKED)


def flatten(value, prefix: str = "") -> dict[str, object]:
    """``{"a": {"b": [1, 2]}}`` → ``{"a.b[0]": 1, "a.b[1]": 2}``; empty containers are leaves."""
    if isinstance(value, dict) and value:
        items = ((f"{prefix}.{k}" if prefix else str(k), v) for k, v in value.items())
    elif isinstance(value, list) and value:
        items = ((f"{prefix}[{i}]", v) for i, v in enumerate(value))
    else:
        return {prefix: value}
    return {key: leaf for k, v in items for key, leaf in flatten(v, k).items()}


def _callbacks(config: dict) -> dict[str, dict]:
    """The leaves of a config's ``trainer.callbacks`` grouped by class path, keyed
    ``trainer.callbacks[<class path>].init_args.<key>`` (``[<class path>][<i>]`` for several instances)."""
    callbacks = (config.get("trainer") or {}).get("callbacks")
    groups: dict[str, list] = {}
    for callback in callbacks if isinstance(callbacks, list) else [callbacks] if callbacks else []:
        name = callback.get("class_path", "?") if isinstance(callback, dict) else str(callback)
        groups.setdefault(name, []).append(callback.get("init_args") if isinstance(callback, dict) else None)
    leaves: dict[str, dict] = {}
    for name, instances in groups.items():
        for i, init_args in enumerate(instances):
            prefix = f"{CALLBACKS}[{name}]" + (f"[{i}]" if len(instances) > 1 else "") + ".init_args"
            leaves.setdefault(name, {}).update(flatten(init_args or {}, prefix))
    return leaves


def differences(previous: dict, current: dict, only_recorded: bool = False) -> list[tuple[str, object, object]]:
    """``(key, checkpoint's value, this run's value)`` of every argument that differs and may not;
    with ``only_recorded``, only the arguments ``previous`` records are compared.

    [chosen] ``trainer.callbacks``: a callback class in both runs must keep its arguments; a callback
    may be added or dropped (a debugging or stopping callback changes no step that was taken). The
    stage plan is a fixed argument group (``stages.*``), compared as any other argument.
    """
    previous, current = dict(previous), dict(current)
    missing = object()
    found = []
    old_callbacks, new_callbacks = _callbacks(previous), _callbacks(current)
    for name in sorted(old_callbacks.keys() & new_callbacks.keys()):
        old, new = old_callbacks[name], new_callbacks[name]
        for key in sorted(old.keys() | new.keys()):
            if old.get(key, missing) != new.get(key, missing):
                found.append((key, old.get(key, missing), new.get(key, missing)))
    for config in (previous, current):
        config["trainer"] = {k: v for k, v in (config.get("trainer") or {}).items() if k != "callbacks"}
    old, new = flatten(previous), flatten(current)
    for key in sorted(old.keys() if only_recorded else old.keys() | new.keys()):
        if not may_change(key) and old.get(key, missing) != new.get(key, missing):
            found.append((key, old.get(key, missing), new.get(key, missing)))
    return [(key, "(not set)" if a is missing else a, "(not set)" if b is missing else b) for key, a, b in found]


def model_config(hparams: dict) -> dict:
    """The checkpoint's model hyper-parameters (as LightningCLI records them) as a config's ``model``."""
    hparams = {k: v for k, v in hparams.items() if k != "_instantiator"}
    return {"class_path": hparams.pop("_class_path", None), "init_args": hparams}


def check_resume(ckpt_path: str | Path, checkpoint: dict, config: dict, subcommand: str) -> None:
    """Refuse, naming every argument, a run whose config differs from the checkpoint's where it may not.

    ``config`` is this run's resolved config (as ``config.yaml`` holds it). A fit compares it whole with
    the config the checkpoint stored; evaluation, and checkpoints that stored none, compare the model's
    arguments (of an older checkpoint: those its ``hyper_parameters`` record).
    """
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ConfigError(
            f"--ckpt_path {ckpt_path}: not a checkpoint of a distill run (no state_dict): --ckpt_path continues a run; "
            "to start from a network's weights, give them as model.init_args.weights (Supervised)"
        )
    stored = ((checkpoint.get("callbacks") or {}).get(CONFIG_STATE_KEY) or {}).get("config")
    if stored is not None and subcommand == "fit":
        found = differences(stored, config)
    elif stored is not None:
        found = differences({"model": stored.get("model")}, {"model": config.get("model")})
    else:
        hparams = {"model": model_config(checkpoint.get("hyper_parameters") or {})}
        found = differences(hparams, {"model": config.get("model")}, only_recorded=True)
    if not found:
        return
    listed = "; ".join(f"{key}={new!r} (the checkpoint has {old!r})" for key, old, new in found[:8])
    more = f" and {len(found) - 8} more" if len(found) > 8 else ""
    action = "resume" if subcommand == "fit" else subcommand
    raise ConfigError(
        f"--ckpt_path {ckpt_path}: {listed}{more}; these arguments define the experiment and may not change "
        f"when you {action} from a checkpoint: give the checkpoint's values (the same --config files), or start "
        "a new run without --ckpt_path (what may change on resume: the README, section 'When things go wrong')"
    )


def check_teacher(ckpt_path: str | Path, checkpoint: dict, teacher_info: dict | None) -> None:
    """Refuse a teacher whose file differs from the one the checkpoint was trained with (its SHA-256)."""
    saved = checkpoint.get("distill_teacher")
    if not saved or teacher_info is None or saved.get("sha256") == teacher_info.get("sha256"):
        return
    raise ConfigError(
        f"--ckpt_path {ckpt_path}: the teacher weights differ from those the checkpoint was trained with: it "
        f"has {saved.get('weights')} (sha256 {saved.get('sha256')}), this run loads {teacher_info.get('weights')} "
        f"(sha256 {teacher_info.get('sha256')}); point teacher_weights at the original file"
    )
