"""``vitsplit.evaluate``: the names of :mod:`vitsplit.evaluation`, importable from here as well
(``from vitsplit.evaluate import IoUMetric``)."""

from .evaluation import *  # noqa: F401,F403
from .evaluation import __all__  # noqa: F401
