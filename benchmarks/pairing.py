"""The callback of ``step_pairs.py``: one plain-loop step after every training step of a Lightning fit.

It lives in a module of its own so that the script and the ``distill`` CLI (which builds it from its
class path, ``--trainer.callbacks+=pairing.PairedPlainSteps``) import the same module object and share
:data:`ARMED`.
"""

from __future__ import annotations

from collections.abc import Callable

import pytorch_lightning as pl

ARMED: dict = {}  # what the next PairedPlainSteps takes: plain_step, clock, pairs (set by step_pairs.py)


class PairedPlainSteps(pl.Callback):
    """Record ``(fit step seconds, plain step seconds)`` per training step.

    A fit step is the interval from one ``on_train_batch_start`` to the next, less the plain step run
    inside it at ``on_train_batch_end``: everything the fit does per loop iteration (batch fetch,
    transfer and augmentation, the step, hooks, logging steps, LR scheduler). The last step of a fit
    has no next start and is not recorded.
    """

    def __init__(self):
        self.plain_step: Callable[[], None] = ARMED["plain_step"]
        self.clock: Callable[[], float] = ARMED["clock"]
        self.pairs: list[tuple[float, float]] = ARMED["pairs"]
        self._start: float | None = None
        self._plain = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = self.clock()
        if self._start is not None:
            self.pairs.append((now - self._start - self._plain, self._plain))
        self._start = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        start = self.clock()
        self.plain_step()
        self._plain = self.clock() - start
