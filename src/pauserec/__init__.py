"""pauserec: export, run and measure PauseRec generative recommenders."""

from pauserec.errors import PauserecError

__version__ = "0.1.0"
__all__ = ["PauserecError", "__version__"]
