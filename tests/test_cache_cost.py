"""The artifact store's atomicity and checks, and the ledger's arithmetic."""
from __future__ import annotations

import pytest

from pipeline.cache import ArtifactStore
from pipeline.cost import PriceCatalog
from pipeline.errors import ProfileError
from pipeline.models import Ledger

from .conftest import REPO


def test_store_roundtrip_and_damage_is_recomputed(tmp_path):
    store = ArtifactStore(tmp_path)
    assert store.get("ab" * 32) is None
    with store.writer("ab" * 32, {"shot": "sc01-sh01"}) as d:
        (d / "clip.mp4").write_bytes(b"x" * 1000)
    files = store.get("ab" * 32)
    assert files and files["clip.mp4"].read_bytes() == b"x" * 1000
    assert store.meta("ab" * 32) == {"shot": "sc01-sh01"}
    files["clip.mp4"].write_bytes(b"y" * 1000)  # same size, different bytes
    assert store.get("ab" * 32) is None
    assert not store.path("ab" * 32).exists()


def test_failed_write_leaves_nothing(tmp_path):
    store = ArtifactStore(tmp_path)
    with pytest.raises(RuntimeError):
        with store.writer("cd" * 32) as d:
            (d / "half.png").write_bytes(b"half")
            raise RuntimeError("stage crashed")
    assert store.get("cd" * 32) is None
    assert not store.path("cd" * 32).exists()
    assert not any((tmp_path / ".staging").iterdir())


def test_files_without_manifest_are_not_an_artifact(tmp_path):
    store = ArtifactStore(tmp_path)
    folder = store.path("ef" * 32)
    folder.mkdir(parents=True)
    (folder / "clip.mp4").write_bytes(b"orphan")
    assert store.get("ef" * 32) is None


def test_prices_and_ledger_arithmetic():
    cat = PriceCatalog.load(REPO / "cluster" / "prices.csv", usd_cny=7.0)
    cpu = next(r for r in cat.rows if r.resource == "cpu" and r.tier == "on-demand")
    assert cat.yuan_per_hour("cpu") == pytest.approx(cpu.price * 7.0)
    assert cat.cost(3600, "cpu", 2) == pytest.approx(2 * cpu.price * 7.0)
    assert cat.yuan_per_hour("gpu:RTX4090-CN") == pytest.approx(1.88)  # CNY rows are not converted
    rec = cat.record("keyframes", "sc01-sh01", 10.0, "cpu", 1.0)
    hit = cat.record("keyframes", "sc01-sh02", 10.0, "cpu", 1.0, cached=True)
    assert hit.yuan == 0 and hit.seconds == 0 and hit.cached
    ledger = Ledger(records=[rec, hit, cat.record("encode", "sc01-sh01", 5.0, "cpu", 1.0)])
    assert ledger.total_yuan == pytest.approx(rec.yuan * 1.5)
    assert ledger.by_stage() == pytest.approx({"keyframes": rec.yuan, "encode": rec.yuan / 2})
    with pytest.raises(ProfileError, match="no on-demand price for resource 'gpu:TPU'"):
        cat.yuan_per_hour("gpu:TPU")
    for row in cat.rows:
        assert row.source and row.checked_at and row.confidence in {"high", "medium", "low"}
