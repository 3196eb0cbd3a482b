"""One LightningModule per method over a small shared base."""

from .base import DistillModule
from .dml import DML
from .kd import OfflineKD
from .kr import KR
from .sokd import SOKD
from .sskd import SSKD
from .supervised import Supervised

__all__ = ["DML", "DistillModule", "KR", "OfflineKD", "SOKD", "SSKD", "Supervised"]
