"""What a method says about itself to the CLI and the tools, read from its init arguments alone.

The CLI names run directories, the results tool places runs in its table and ``distill export``
finds the networks of a checkpoint by asking the method's class (:meth:`DistillModule.card`,
:attr:`DistillModule.exported`), never by its name: adding a method touches no tool. The arguments
come from a run's ``config.yaml`` (``model.init_args``), a checkpoint's ``hyper_parameters`` or the
CLI's parsed config, so they are plain mappings (or jsonargparse namespaces).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError


@dataclass(frozen=True)
class RunCard:
    """How a run of a method appears in run directories and in the results table.

    Args:
        column: the table column, e.g. ``kd``, ``crd+kd``, ``pwkd:kd``, ``supervised``.
        student: the network the run trains (the table row's student).
        teacher: the teacher of a distillation run (the table row is ``teacher → student``).
        name_parts: the networks in the run directory's name, ``runs/<dataset>/<method>/<a-b>``.
        student_column: for a run without a teacher, the column it fills in every pair whose student
            is its network (``student`` for a from-scratch run, ``dml`` for DML).
        teacher_column: the column it fills in every pair whose teacher is its network (``teacher``,
            ``slimmable teacher``).
    """

    column: str
    student: str
    teacher: str | None = None
    name_parts: tuple[str, ...] = ()
    student_column: str | None = None
    teacher_column: str | None = None


@dataclass(frozen=True)
class Network:
    """A network of a method's checkpoint that ``distill export`` can write.

    Args:
        prefix: its keys in the method's ``state_dict`` (``student.``, ``peer.``).
        arch_arg: the init argument that names its architecture.
        kwargs_arg: the init argument holding its extra constructor arguments.
        assemble: for a network that is not stored whole in the checkpoint (SOKD's improved teacher),
            a function ``checkpoint path -> state_dict`` that builds its weights.
    """

    prefix: str
    arch_arg: str
    kwargs_arg: str | None = None
    assemble: Callable[[Path], dict] | None = None


def class_name(spec) -> str:
    """``KDTerm`` from ``"distill.losses.KDTerm"``, ``{"class_path": ...}`` or a namespace with ``class_path``."""
    path = spec if isinstance(spec, str) else (spec.get("class_path") if isinstance(spec, Mapping) else None)
    path = path or getattr(spec, "class_path", None)
    if not isinstance(path, str):
        raise ConfigError(f"expected a class_path, got {spec!r}")
    return path.rsplit(".", 1)[-1]


def term_names(args: Mapping) -> list[str]:
    """Sorted short names of the ``terms`` argument (``KDTerm`` → ``kd``)."""
    return sorted(class_name(t).removesuffix("Term").lower() for t in args.get("terms") or [])


def method_class(class_path: str):
    """The method class a config or checkpoint names, with a clear error when it cannot be imported."""
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ConfigError(f"cannot import the method class {class_path!r} ({error})") from error
