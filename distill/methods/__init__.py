"""One LightningModule per method over a small shared base."""
from .base import DistillModule
from .dml import DML
from .kd import OfflineKD
from .supervised import Supervised

__all__ = ["DML", "DistillModule", "OfflineKD", "Supervised"]
