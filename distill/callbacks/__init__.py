"""Callbacks the CLI adds to every fit: the stage plan, checkpoints, preemption, run summary."""

from .best_checkpoint import BestCheckpoint
from .preemption import PreemptionCheckpoint
from .run_summary import RunSummary
from .stages import StagePlan

__all__ = ["BestCheckpoint", "PreemptionCheckpoint", "RunSummary", "StagePlan"]
