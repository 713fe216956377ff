"""Checkpoint -> engine directory: our graph wrappers, ONNX export, validation, manifest, TensorRT.

``export_engine(ExportConfig(checkpoint, out, ...)) -> ExportReport`` is the one entry point (the
``pauserec-export`` command is a thin layer over it; the steps are in ``pauserec.export.pipeline``).
torch, transformers and onnx are imported inside the functions, so importing this package stays cheap.
"""

from __future__ import annotations

from pauserec.export.config import BACKENDS, PRECISIONS, SCORING, ExportConfig, ExportReport, Progress
from pauserec.export.pipeline import build_graphs, export_engine

__all__ = ["BACKENDS", "PRECISIONS", "SCORING", "ExportConfig", "ExportReport", "Progress", "build_graphs",
           "export_engine"]
