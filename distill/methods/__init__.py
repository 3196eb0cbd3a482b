"""One LightningModule per method over a small shared base (configs name them ``distill.methods.<Name>``)."""

from .base import DistillModule
from .dml import DML
from .kd import OfflineKD
from .kr import KR
from .pwkd import PWKD
from .slimmable_supervised import SlimmableSupervised
from .sokd import SOKD
from .sskd import SSKD
from .supervised import Supervised

__all__ = ["DML", "DistillModule", "KR", "OfflineKD", "PWKD", "SOKD", "SSKD", "SlimmableSupervised", "Supervised"]
