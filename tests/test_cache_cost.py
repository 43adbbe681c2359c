"""The artifact store's atomicity and checks, and the ledger's arithmetic."""
from __future__ import annotations

import json
import os
import threading
import time
import uuid

import fsspec
import pytest
from fsspec.core import url_to_fs
from typer.testing import CliRunner

from pipeline.cache import MANIFEST, STAGING, ArtifactStore, LocalStore, RemoteStore, StoreError
from pipeline.cli_cache import cache_app, parse_duration, parse_size
from pipeline.cost import PriceCatalog
from stages.records import ProfileError
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


# --------------------------------------------------------------------------- every layout behaves alike

KEY, KEY2, KEY3 = "ab" * 32, "cd" * 32, "ef" * 32
DAY = 86400.0


@pytest.fixture(params=["path", "file-url", "memory"])
def store(request, tmp_path):
    """The same store API on a local path, a file:// URL and an in-process fsspec filesystem."""
    if request.param == "memory":
        url = f"memory://anim-test-{uuid.uuid4().hex[:12]}"
        s = ArtifactStore(url, local_cache=tmp_path / "readthrough")
        yield s
        fs, root = url_to_fs(url)
        if fs.exists(root):
            fs.rm(root, recursive=True)
        return
    root = tmp_path / "store"
    yield ArtifactStore(root if request.param == "path" else f"file://{root}")


def _stored(store, name: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Where the store keeps file ``name`` of KEY (the remote object, not a read-through copy)."""
    fs, root = url_to_fs(store.url)
    [path] = [p for p in fs.find(root) if p.rsplit("/", 1)[-1] == name and KEY in p]
    return fs, path


def _fresh_reader(store, tmp_path):
    """The same store opened from its URL, as a Ray worker on another machine would (empty local cache)."""
    return ArtifactStore(store.url, local_cache=tmp_path / f"other-{uuid.uuid4().hex[:6]}")


def _write(store, key: str, stage: str, files: dict[str, bytes]) -> None:
    with store.writer(key, {"stage": stage, "shot": "sc01-sh01"}) as d:
        for name, data in files.items():
            (d / name).write_bytes(data)


def test_layouts_roundtrip_and_reopen_from_url(store, tmp_path):
    assert store.get(KEY) is None
    _write(store, KEY, "clip", {"clip.mp4": b"x" * 1000, "panel.png": b"p" * 10})
    files = store.get(KEY)
    assert files and files["clip.mp4"].read_bytes() == b"x" * 1000 and files["panel.png"].read_bytes() == b"p" * 10
    assert store.meta(KEY) == {"stage": "clip", "shot": "sc01-sh01"}
    again = _fresh_reader(store, tmp_path)
    assert type(again) is type(store) and again.url == store.url
    assert {n: p.read_bytes() for n, p in again.get(KEY).items()} == {n: p.read_bytes() for n, p in files.items()}
    assert isinstance(store, RemoteStore if store.url.startswith("memory") else LocalStore)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete-file", "manifest-garbage"])
def test_damaged_entry_is_absent_and_removed(store, tmp_path, damage):
    _write(store, KEY, "clip", {"clip.mp4": b"x" * 1000, "sub.srt": b"s" * 20})
    if damage == "manifest-garbage":
        fs, path = _stored(store, MANIFEST)
        fs.pipe_file(path, b'{"files": {"clip.mp4": ')
    else:
        fs, path = _stored(store, "clip.mp4")
        if damage == "flip":
            fs.pipe_file(path, b"x" * 999 + b"y")  # same size, different bytes
        elif damage == "truncate":
            fs.pipe_file(path, b"x" * 500)
        else:
            fs.rm_file(path)
    reader = _fresh_reader(store, tmp_path)  # a remote store must download, and so check, every file
    assert reader.get(KEY) is None
    assert not any(p.endswith(MANIFEST) for p in fs.find(url_to_fs(store.url)[1]))  # removed, not just skipped
    assert store.get(KEY) is None
    _write(store, KEY, "clip", {"clip.mp4": b"z" * 1000})  # and recomputed
    assert store.get(KEY)["clip.mp4"].read_bytes() == b"z" * 1000


def test_files_without_manifest_are_absent(store):
    _write(store, KEY, "clip", {"clip.mp4": b"x" * 100})
    fs, path = _stored(store, MANIFEST)
    fs.rm_file(path)
    assert store.get(KEY) is None
    assert store.stats().entries == 0


def test_failed_write_leaves_nothing_on_any_layout(store):
    with pytest.raises(RuntimeError):
        with store.writer(KEY2) as d:
            (d / "half.png").write_bytes(b"half")
            assert store.get(KEY2) is None  # no manifest is visible while the body runs
            raise RuntimeError("stage crashed")
    assert store.get(KEY2) is None
    fs, root = url_to_fs(store.url)
    assert [p for p in fs.find(root) if STAGING not in p] == []
    s = store.stats()
    assert (s.entries, s.damaged, s.staging) == (0, 0, 0)


def test_reserved_and_nested_names_are_refused(store):
    with pytest.raises(StoreError, match="reserves"):
        with store.writer(KEY) as d:
            (d / MANIFEST).write_text("{}")
    with pytest.raises(StoreError, match="flat"):
        with store.writer(KEY) as d:
            (d / "sub").mkdir()
    with pytest.raises(StoreError, match="hex content key"):
        store.get("../etc")
    assert store.get(KEY) is None


def test_concurrent_writers_of_one_key(store):
    """Both writers finish at once; exactly one complete artifact survives and readers never see half of one."""
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []
    seen: list[dict | None] = []
    stop = threading.Event()

    def write(i: int) -> None:
        try:
            with store.writer(KEY, {"stage": "keyframes"}) as d:
                for name in ("a.bin", "b.bin", "c.bin"):
                    (d / name).write_bytes(f"writer{i}".encode() * 5000)
                barrier.wait(timeout=5)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread below
            errors.append(exc)

    def read() -> None:
        while not stop.is_set():
            files = store.get(KEY)
            seen.append(None if files is None else {n: p.read_bytes() for n, p in files.items()})

    threads = [threading.Thread(target=write, args=(i,)) for i in (1, 2)]
    reader = threading.Thread(target=read)
    reader.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    reader.join()
    assert not errors
    final = {n: p.read_bytes() for n, p in store.get(KEY).items()}
    assert sorted(final) == ["a.bin", "b.bin", "c.bin"] and len(set(final.values())) == 1
    for files in filter(None, seen):  # every hit a reader got was one writer's complete set
        assert sorted(files) == ["a.bin", "b.bin", "c.bin"] and len(set(files.values())) == 1
    assert store.stats().entries == 1


def test_read_through_cache_verifies_its_copies(tmp_path):
    store = ArtifactStore(f"memory://anim-test-{uuid.uuid4().hex[:12]}", local_cache=tmp_path / "rt")
    _write(store, KEY, "clip", {"clip.mp4": b"x" * 1000})
    reader = _fresh_reader(store, tmp_path)
    copy = reader.get(KEY)["clip.mp4"]
    assert copy.is_relative_to(tmp_path) and copy.read_bytes() == b"x" * 1000
    copy.write_bytes(b"y" * 1000)  # a damaged local copy is downloaded again, the store is untouched
    assert reader.get(KEY)["clip.mp4"].read_bytes() == b"x" * 1000
    copy.unlink()
    assert reader.get(KEY)["clip.mp4"].read_bytes() == b"x" * 1000
    assert store.stats().entries == 1


def test_a_remote_hit_records_its_use_at_most_hourly(tmp_path):
    store = ArtifactStore(f"memory://anim-test-{uuid.uuid4().hex[:12]}", local_cache=tmp_path / "rt")
    _write(store, KEY, "clip", {"clip.mp4": b"x"})
    store.touch(KEY, time.time() - 2 * DAY)
    assert store.get(KEY) is not None  # the marker is old: this hit is written
    first = store.stats().newest_use
    assert time.time() - first < 60
    store.fs.pipe_file(f"{url_to_fs(store.url)[1]}/ab/{KEY}/used", repr(first - 1000).encode())
    assert store.get(KEY) is not None  # within the hour: no write
    assert store.stats().newest_use == pytest.approx(first - 1000)


def test_local_hit_touches_the_manifest(tmp_path):
    store = ArtifactStore(tmp_path)
    _write(store, KEY, "clip", {"clip.mp4": b"x"})
    old = time.time() - 5 * DAY
    os.utime(store.path(KEY) / MANIFEST, (old, old))
    assert store.stats().oldest_use == pytest.approx(old)
    store.get(KEY)
    assert time.time() - store.stats().oldest_use < 60


def _populate(store) -> float:
    """Three entries of 1000, 2000 and 3000 bytes last used 40 days, 10 days and 1 hour ago."""
    now = time.time()
    for key, stage, size, age in ((KEY, "keyframes", 1000, 40 * DAY), (KEY2, "clip", 2000, 10 * DAY),
                                  (KEY3, "clip", 3000, 3600.0)):
        _write(store, key, stage, {"data.bin": b"d" * size})
        store.touch(key, now - age)
    return now


def test_stats_numbers(store):
    now = _populate(store)
    s = store.stats()
    assert (s.entries, s.bytes, s.damaged, s.staging) == (3, 6000, 0, 0)
    assert {k: (v.entries, v.bytes) for k, v in s.by_stage.items()} == {"clip": (2, 5000), "keyframes": (1, 1000)}
    assert s.oldest_use == pytest.approx(now - 40 * DAY, abs=1) and s.newest_use == pytest.approx(now - 3600, abs=1)
    assert s.location == store.url


def test_gc_by_age_then_by_size(store):
    _populate(store)
    dry = store.gc(older_than_s=30 * DAY, dry_run=True)
    assert [(i.what, i.reason) for i in dry.removed] == [(KEY, "age")] and dry.bytes_freed == 1000
    assert store.stats().entries == 3  # a dry run removes nothing

    report = store.gc(older_than_s=30 * DAY, max_bytes=3500)
    assert [(i.what, i.reason) for i in report.removed] == [(KEY, "age"), (KEY2, "size")]
    assert (report.bytes_freed, report.entries_left, report.bytes_left) == (3000, 1, 3000)
    assert store.get(KEY) is None and store.get(KEY2) is None and store.get(KEY3) is not None
    fs, root = url_to_fs(store.url)
    assert not [p for p in fs.find(root) if KEY in p or KEY2 in p]
    assert store.gc(max_bytes=0).bytes_left == 0 and store.stats().entries == 0


def test_gc_removes_stale_leftovers_never_fresh_ones(store):
    _write(store, KEY, "clip", {"clip.mp4": b"x" * 100})
    fs, root = url_to_fs(store.url)
    if isinstance(store, LocalStore):
        stale, fresh = store.root / STAGING / "stale", store.root / STAGING / "fresh"
        for d in (stale, fresh):
            d.mkdir()
            (d / "half.png").write_bytes(b"h" * 50)
        two_hours_ago = time.time() - 7200
        for p in (stale / "half.png", stale):
            os.utime(p, (two_hours_ago, two_hours_ago))
    else:  # uploads under a write id that no manifest names: one two hours old, one just begun
        fs.pipe_file(f"{root}/cd/{KEY2}/{int(time.time() - 7200)}-0123456789ab/half.png", b"h" * 50)
        fs.pipe_file(f"{root}/cd/{KEY2}/{int(time.time())}-0123456789ab/half.png", b"h" * 50)
    assert store.stats().staging == 2
    report = store.gc()
    assert [(i.reason, i.bytes) for i in report.removed] == [("staging", 50)]
    assert store.stats().staging == 1 and store.get(KEY) is not None


def test_store_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(StoreError, match="nosuch"):
        ArtifactStore("nosuch://bucket/prefix")
    store = ArtifactStore(tmp_path)
    with pytest.raises(StoreError, match="no artifact"):
        store.meta(KEY)
    with pytest.raises(StoreError, match="max_bytes"):
        store.gc(max_bytes=-1)


# --------------------------------------------------------------------------- anim cache


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
    store = ArtifactStore(tmp_path / "store")
    _populate(store)
    runner = CliRunner()
    loc = ["--store", str(tmp_path / "store")]

    res = runner.invoke(cache_app, ["stats", *loc, "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["entries"] == 3 and json.loads(res.output)["bytes"] == 6000
    res = runner.invoke(cache_app, ["stats", *loc])
    assert res.exit_code == 0 and "keyframes" in res.output and "5.9 KiB" in res.output

    res = runner.invoke(cache_app, ["gc", *loc, "--older-than", "30d", "--dry-run"])
    assert res.exit_code == 0 and "would remove 1 item(s)" in res.output
    assert store.stats().entries == 3
    res = runner.invoke(cache_app, ["gc", *loc, "--older-than", "30d", "--max-size", "3.5K", "--json"])
    assert res.exit_code == 0, res.output
    assert [i["what"] for i in json.loads(res.output)["removed"]] == [KEY, KEY2]
    assert store.stats().entries == 1

    res = runner.invoke(cache_app, ["gc", *loc, "--max-size", "lots"])
    assert res.exit_code == 2 and "expected a size like" in res.output and "Traceback" not in res.output
    res = runner.invoke(cache_app, ["stats", "--store", "nosuch://x"])
    assert res.exit_code == 2 and "cannot be opened" in res.output


def test_cli_default_store_is_anim_store(tmp_path, monkeypatch):
    store = ArtifactStore(tmp_path / "env-store")
    _write(store, KEY, "clip", {"clip.mp4": b"x"})
    monkeypatch.setenv("ANIM_STORE", str(tmp_path / "env-store"))
    res = CliRunner().invoke(cache_app, ["stats", "--json"])
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
