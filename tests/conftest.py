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


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    """A small seeded synthetic dataset in LC-Rec layout (4 levels, collisions included)."""
    from pauserec.data.synthetic import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("synthetic"), seed=0)
