"""Shared fixtures. Real data comes from ../shared/data beside the checkout (CI has it there)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SCIENTIFIC = SHARED_DATA / "amazon18-scientific-lcrec"


@pytest.fixture(scope="session")
def scientific() -> Path:
    """The real Amazon'18 Industrial_and_Scientific dataset (LC-Rec format, ten SID indexes)."""
    if not SCIENTIFIC.is_dir():
        pytest.skip(f"real dataset not found at {SCIENTIFIC}")
    return SCIENTIFIC


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one torch thread, and it spares the core ONNX Runtime works on."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    """A small seeded synthetic dataset in LC-Rec layout (4 levels, collisions included)."""
    from pauserec.data.synthetic import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("synthetic"), seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoints(synthetic_data, tmp_path_factory) -> dict[str, Path]:
    """Tiny seeded checkpoints {"direct", "pause" (k=5), "cot"} trained for a few seconds on synthetic_data.

    Deterministic: fixed seed, fixed step count (no time budget), one torch thread.
    """
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from pauserec.train.sft import TrainConfig, train

    root = tmp_path_factory.mktemp("tiny_checkpoints")
    return {
        kind: train(
            TrainConfig(data=synthetic_data, index=None, kind=kind, out=root / kind, preset="tiny", seed=0, threads=1)
        ).out
        for kind in ("direct", "pause", "cot")
    }


@pytest.fixture(scope="session")
def trained_engines(tiny_checkpoints, tmp_path_factory) -> dict[str, Path]:
    """The tiny checkpoints exported to engine directories {"direct", "pause", "cot"}."""
    from pauserec.export import ExportConfig, export_engine

    root = tmp_path_factory.mktemp("trained_engines")
    return {kind: export_engine(ExportConfig(checkpoint=ck, out=root / kind)).out for kind, ck in tiny_checkpoints.items()}
