"""``anim cache`` and the ledger's arithmetic (the store itself is tested in test_store.py)."""
from __future__ import annotations

import errno
import json
import pathlib
import time

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.cli_cache import parse_duration, parse_size
from pipeline.cost import PriceCatalog
from pipeline.models import Ledger
from pipeline.store import open_store
from stages.records import ProfileError

from .conftest import REPO

KEY, KEY2, KEY3 = "ab" * 32, "cd" * 32, "ef" * 32
DAY = 86400.0


def _populate(store) -> None:
    """Three entries of 1000, 2000 and 3000 bytes last used 40 days, 10 days and 1 hour ago."""
    now = time.time()
    for key, stage, size, age in ((KEY, "keyframes", 1000, 40 * DAY), (KEY2, "clip", 2000, 10 * DAY),
                                  (KEY3, "clip", 3000, 3600.0)):
        with store.writer(key, {"stage": stage}) as d:
            (d / "data.bin").write_bytes(b"d" * size)
        store.touch(key, now - age)


# --------------------------------------------------------------------------- anim cache
# Invoked through the top-level app, whose callback resolves the settings once.


def test_parse_duration_and_size():
    assert parse_duration("30d") == 30 * DAY and parse_duration("12h") == 43200 and parse_duration("90") == 90
    assert parse_duration("1.5m") == 90
    assert parse_size("10G") == 10 << 30 and parse_size("500MiB") == 500 << 20 and parse_size("2t") == 2 << 40
    assert parse_size("123") == 123
    for bad in ("ten", "10X", "-5G", ""):
        with pytest.raises(ValueError, match="expected a size"):
            parse_size(bad)
    with pytest.raises(ValueError, match="expected an age"):
        parse_duration("3 weeks")


def test_cli_stats_and_gc(tmp_path):
    store = open_store(tmp_path / "store")
    _populate(store)
    runner = CliRunner()
    loc = ["--store", str(tmp_path / "store")]

    res = runner.invoke(app, ["cache", "stats", *loc, "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["entries"] == 3 and json.loads(res.output)["bytes"] == 6000
    res = runner.invoke(app, ["cache", "stats", *loc])
    assert res.exit_code == 0 and "keyframes" in res.output and "5.9 KiB" in res.output

    res = runner.invoke(app, ["cache", "gc", *loc, "--older-than", "30d", "--dry-run"])
    assert res.exit_code == 0 and "would remove 1 item(s)" in res.output
    assert store.stats().entries == 3
    res = runner.invoke(app, ["cache", "gc", *loc, "--older-than", "30d", "--max-size", "3.5K", "--json"])
    assert res.exit_code == 0, res.output
    assert [i["what"] for i in json.loads(res.output)["removed"]] == [KEY, KEY2]
    assert store.stats().entries == 1

    res = runner.invoke(app, ["cache", "gc", *loc, "--max-size", "lots"])
    assert res.exit_code == 2 and "expected a size like" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["cache", "stats", "--store", "nosuch://x"])
    assert res.exit_code == 2 and "cannot be opened" in res.output


def test_cli_reports_an_unreadable_store_and_removes_nothing(tmp_path, monkeypatch):
    store = open_store(tmp_path / "store")
    _populate(store)
    real_open = pathlib.Path.open

    def failing_open(self, mode="r", *args, **kwargs):
        if self.name == "manifest.json" and KEY2 in str(self) and mode.startswith("r"):
            raise OSError(errno.EIO, "Input/output error")
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "open", failing_open)
    res = CliRunner().invoke(app, ["cache", "gc", "--store", str(tmp_path / "store"), "--max-size", "0"])
    assert res.exit_code == 2 and KEY2[:12] in res.output and "nothing was removed" in res.output
    assert "Traceback" not in res.output
    monkeypatch.undo()
    assert store.stats().entries == 3


def test_cli_default_store_is_anim_store(tmp_path, monkeypatch):
    store = open_store(tmp_path / "env-store")
    with store.writer(KEY, {"stage": "clip"}) as d:
        (d / "clip.mp4").write_bytes(b"x")
    monkeypatch.setenv("ANIM_STORE", str(tmp_path / "env-store"))
    res = CliRunner().invoke(app, ["cache", "stats", "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["location"] == store.url


def test_prices_and_ledger_arithmetic():
    cat = PriceCatalog.load(REPO / "cluster" / "prices.csv", usd_cny=7.0)
    cpu = next(r for r in cat.rows if r.resource == "cpu" and r.tier == "on-demand")
    assert cat.yuan_per_hour("cpu") == pytest.approx(cpu.price * 7.0)
    assert cat.cost(3600, "cpu", 2) == pytest.approx(2 * cpu.price * 7.0)
    autodl = cat.model_copy(update={"provider": "autodl"})
    assert autodl.yuan_per_hour("gpu:RTX4090") == pytest.approx(1.88)  # CNY rows are not converted
    rec = cat.record("keyframes", "sc01-sh01", 10.0, "cpu", 1.0)
    hit = cat.record("keyframes", "sc01-sh02", 10.0, "cpu", 1.0, cached=True)
    assert hit.yuan == 0 and hit.seconds == 0 and hit.cached
    ledger = Ledger(records=[rec, hit, cat.record("encode", "sc01-sh01", 5.0, "cpu", 1.0)])
    assert ledger.total_yuan == pytest.approx(rec.yuan * 1.5)
    assert ledger.by_stage() == pytest.approx({"keyframes": rec.yuan, "encode": rec.yuan / 2})
    # Several providers: the cheapest row prices a resource unless a provider is chosen.
    assert cat.row("gpu:H100").provider == "runpod-community"
    assert cat.model_copy(update={"provider": "aws"}).row("gpu:H100").price == pytest.approx(6.88)
    assert cat.with_tier("spot").yuan_per_hour("gpu:H200") < cat.yuan_per_hour("gpu:H200")
    with pytest.raises(ProfileError, match="no on-demand price for resource 'gpu:TPU'"):
        cat.yuan_per_hour("gpu:TPU")
    for row in cat.rows:
        assert row.source and row.checked_at and row.confidence in {"high", "medium", "low"}
