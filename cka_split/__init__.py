"""cka-split analysis: block features -> minibatch CKA -> split recommendation.

``recommend_split`` and ``SplitRecommendation`` are imported lazily from :mod:`cka_split.decision.recommend`
(module ``__getattr__``), so ``import cka_split`` works without pulling that module in.
"""

from cka_split.estimator.analysis import analyze
from cka_split.estimator.cka import MinibatchCKA, linear_cka
from cka_split.estimator.result import CKAResult

__all__ = ["linear_cka", "MinibatchCKA", "analyze", "CKAResult", "recommend_split", "SplitRecommendation"]

_LAZY = {"recommend_split": "decision.recommend", "SplitRecommendation": "decision.recommend"}


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
