"""Shared test fixtures: paths to the repo and to the real third-party material in ../shared/data."""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="session")
def calibration():
    """The committed throughput calibration table."""
    from pipeline.calibration import Calibration

    return Calibration.load(REPO / "cluster" / "calibration.csv")


@pytest.fixture(scope="session")
def prices():
    """The committed price catalog at a fixed FX rate."""
    from pipeline.cost import PriceCatalog

    return PriceCatalog.load(REPO / "cluster" / "prices.csv", usd_cny=7.10)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray cluster of this test module's own (``address="local"``, never a stray one),
    reused by the module's renders; yields its GCS address."""
    import ray

    from pipeline.dag import Cluster

    Cluster().start()
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"the shared test material is missing: expected {SHARED_DATA}")
    return SHARED_DATA


FRAMES = SHARED_DATA / "frames"


def read_rgb(path: Path) -> np.ndarray:
    image = cv2.imread(str(path))
    assert image is not None, f"missing test frame {path}"
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def shared_triplets() -> dict[str, tuple[Path, Path, Path]]:
    """The real frame triplets (before, middle, after) of ../shared/data/frames, by name: every
    consecutive PNG triple (Sintel raft 3, alley clean 2, alley final 2, Big Buck Bunny 3), the
    set its README quotes RIFE (about 31.5 dB) and crossfade (about 25.0 dB) on."""
    out = {}
    for folder, first, last in (("sintel_raft_demo", 16, 20), ("sintel_alley1_clean", 1, 4), ("sintel_alley1_final", 1, 4)):
        for n in range(first, last - 1):
            out[f"{folder}/{n + 1}"] = tuple(FRAMES / folder / f"frame_{i:04d}.png" for i in (n, n + 1, n + 2))
    for n in (120, 430, 487):
        d = FRAMES / "bbb" / f"triplet_f{n:04d}"
        out[f"bbb/{n}"] = tuple(d / f"frame_{i:04d}.png" for i in (n - 1, n, n + 1))
    return out
