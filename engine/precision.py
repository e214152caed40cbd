"""Mixed precision for the training loop: the same autocast context as everywhere else (`utils.autocast`)."""
from utils.device import autocast

__all__ = ['autocast']
