"""Torch-free runtime: engines, trie-constrained beam search, the trie-masked top-k kernel.

    from pauserec.runtime import Engine, Recommender
    rec = Recommender(Engine.load("engine/"))
    out = rec.recommend([["12", "7", "301"]], k=10, beams=20)   # out.items, out.scores, out.sids

Never imports torch (nor ``pauserec.export``); onnxruntime / tensorrt load when an engine opens.
"""

from __future__ import annotations

_EXPORTS = {
    "Engine": "pauserec.runtime.engine",
    "Recommender": "pauserec.runtime.recommender",
    "Recommendations": "pauserec.runtime.recommender",
    "BeamSearch": "pauserec.runtime.beam",
    "Timings": "pauserec.runtime.beam",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pauserec.runtime' has no attribute {name!r}")


__all__ = list(_EXPORTS)
