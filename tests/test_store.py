"""The artifact store: atomic writes, first writer wins, proven damage removed, transient faults
raised and nothing removed, on both layouts (a local directory and an fsspec filesystem)."""
from __future__ import annotations

import errno
import json
import os
import pathlib
import subprocess
import sys
import threading
import time
import uuid

import fsspec
import pytest
from fsspec.core import url_to_fs
from fsspec.implementations.memory import MemoryFileSystem

from pipeline.store import LocalStore, RemoteStore, Store, StoreError, open_store
from pipeline.store.manifest import MANIFEST, STAGING, USED

from .conftest import REPO


def test_store_roundtrip_and_damage_is_recomputed(tmp_path):
    store = open_store(tmp_path)
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
    store = open_store(tmp_path)
    with pytest.raises(RuntimeError):
        with store.writer("cd" * 32) as d:
            (d / "half.png").write_bytes(b"half")
            raise RuntimeError("stage crashed")
    assert store.get("cd" * 32) is None
    assert not store.path("cd" * 32).exists()
    assert not any((tmp_path / ".staging").iterdir())


def test_files_without_manifest_are_not_an_artifact(tmp_path):
    store = open_store(tmp_path)
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
        s = open_store(url, local_cache=tmp_path / "readthrough")
        yield s
        fs, root = url_to_fs(url)
        if fs.exists(root):
            fs.rm(root, recursive=True)
        return
    root = tmp_path / "store"
    yield open_store(root if request.param == "path" else f"file://{root}")


def _stored(store, name: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Where the store keeps file ``name`` of KEY (the remote object, not a read-through copy)."""
    fs, root = url_to_fs(store.url)
    [path] = [p for p in fs.find(root) if p.rsplit("/", 1)[-1] == name and KEY in p]
    return fs, path


def _fresh_reader(store, tmp_path):
    """The same store opened from its URL, as a Ray worker on another machine would (empty local cache)."""
    return open_store(store.url, local_cache=tmp_path / f"other-{uuid.uuid4().hex[:6]}")


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
                barrier.wait(timeout=120)  # only a hung writer reaches this; speed decides nothing
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
    store = open_store(f"memory://anim-test-{uuid.uuid4().hex[:12]}", local_cache=tmp_path / "rt")
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
    store = open_store(f"memory://anim-test-{uuid.uuid4().hex[:12]}", local_cache=tmp_path / "rt")
    _write(store, KEY, "clip", {"clip.mp4": b"x"})
    store.touch(KEY, time.time() - 2 * DAY)
    before = time.time()
    assert store.get(KEY) is not None  # the marker is old: this hit is written
    first = store.stats().newest_use
    assert first >= before - 1  # (1 s: mtime granularity)
    store.fs.pipe_file(f"{url_to_fs(store.url)[1]}/ab/{KEY}/used", repr(first - 1000).encode())
    assert store.get(KEY) is not None  # within the hour: no write
    assert store.stats().newest_use == pytest.approx(first - 1000)


def test_local_hit_touches_the_manifest(tmp_path):
    store = open_store(tmp_path)
    _write(store, KEY, "clip", {"clip.mp4": b"x"})
    old = time.time() - 5 * DAY
    os.utime(store.path(KEY) / MANIFEST, (old, old))
    assert store.stats().oldest_use == pytest.approx(old)
    before = time.time()
    store.get(KEY)
    assert store.stats().oldest_use >= before - 1  # (1 s: mtime granularity)


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
        open_store("nosuch://bucket/prefix")
    store = open_store(tmp_path)
    with pytest.raises(StoreError, match="no artifact"):
        store.meta(KEY)
    with pytest.raises(StoreError, match="max_bytes"):
        store.gc(max_bytes=-1)


def test_open_store_picks_the_layout(tmp_path):
    assert type(open_store(tmp_path / "a")) is LocalStore
    assert type(open_store(str(tmp_path / "b"))) is LocalStore
    assert type(open_store(f"file://{tmp_path}/c")) is LocalStore
    remote = open_store(f"memory://anim-test-{uuid.uuid4().hex[:12]}", local_cache=tmp_path / "rt")
    assert type(remote) is RemoteStore and isinstance(remote, Store)
    for nothing in (None, "", "   "):
        with pytest.raises(StoreError, match="needs a location"):
            open_store(nothing)
    with pytest.raises(TypeError):
        Store()  # the base names what each layout implements; it opens nothing itself


def test_importing_the_store_does_not_import_fsspec():
    code = "import sys, pipeline.store; assert 'fsspec' not in sys.modules, 'fsspec imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# --------------------------------------------------------------------------- a failed read is not damage


class FlakyMemoryFileSystem(MemoryFileSystem):
    """fsspec's real in-memory filesystem, whose reads of chosen files of KEY fail as a network store's can."""

    protocol = "flakymem"
    store: dict = {}
    pseudo_dirs = [""]
    faults: dict[str, BaseException] = {}  # file name -> what reading it raises

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, str):
            path = path.removeprefix("flakymem://")
        return super()._strip_protocol(path)

    def _fault(self, path) -> None:
        path = str(path)
        exc = self.faults.get(path.rsplit("/", 1)[-1])
        if exc is not None and KEY in path:
            raise exc

    def cat_file(self, path, start=None, end=None, **kwargs):
        self._fault(path)
        return super().cat_file(path, start=start, end=end, **kwargs)

    def get_file(self, rpath, lpath=None, **kwargs):
        self._fault(rpath)
        return super().get_file(rpath, lpath, **kwargs)


fsspec.register_implementation("flakymem", FlakyMemoryFileSystem, clobber=True)

FAULTS = [pytest.param(lambda: OSError(errno.EIO, "Input/output error"), id="EIO"),
          pytest.param(lambda: TimeoutError("the read timed out"), id="timeout"),
          pytest.param(lambda: PermissionError(errno.EACCES, "Permission denied"), id="permission")]


@pytest.fixture(params=["local", "remote"])
def flaky(request, tmp_path, monkeypatch):
    """A store holding one intact entry KEY, and ``faults``: ``faults[name] = exc`` makes every read
    of KEY's file ``name`` raise ``exc`` (a real filesystem underneath; only the read fails)."""
    faults: dict[str, BaseException] = {}
    if request.param == "local":
        real_open = pathlib.Path.open  # read_bytes and the checksum both read through it

        def flaky_open(self, mode="r", *args, **kwargs):
            exc = faults.get(self.name)
            if exc is not None and mode.startswith("r") and KEY in str(self):
                raise exc
            return real_open(self, mode, *args, **kwargs)

        monkeypatch.setattr(pathlib.Path, "open", flaky_open)
        store = open_store(tmp_path / "store")
    else:
        monkeypatch.setattr(FlakyMemoryFileSystem, "faults", faults)
        monkeypatch.setattr(FlakyMemoryFileSystem, "store", {})
        monkeypatch.setattr(FlakyMemoryFileSystem, "pseudo_dirs", [""])
        store = open_store(f"flakymem://anim-test-{uuid.uuid4().hex[:12]}", local_cache=tmp_path / "rt")
    _write(store, KEY, "clip", {"clip.mp4": b"x" * 1000, "sub.srt": b"s" * 20})
    yield store, faults
    faults.clear()


def _listing(store) -> list[str]:
    """Every file the store holds outside staging (a listing reads no file, so no fault fires)."""
    fs, root = url_to_fs(store.url)
    return sorted(p for p in fs.find(root) if STAGING not in p)


def _assert_intact(reader) -> None:
    files = reader.get(KEY)
    assert files is not None
    assert files["clip.mp4"].read_bytes() == b"x" * 1000 and files["sub.srt"].read_bytes() == b"s" * 20


@pytest.mark.parametrize("name", [MANIFEST, "clip.mp4"])
@pytest.mark.parametrize("fault", FAULTS)
def test_a_failed_read_raises_and_removes_nothing(flaky, tmp_path, name, fault):
    store, faults = flaky
    before = _listing(store)
    reader = _fresh_reader(store, tmp_path)  # a remote reader has no copies: it downloads every file
    faults[name] = exc = fault()
    with pytest.raises(StoreError) as info:
        reader.get(KEY)
    message = str(info.value)
    assert KEY[:12] in message and store.url in message and name in message and "nothing was removed" in message
    assert info.value.__cause__ is exc
    assert _listing(store) == before
    faults.clear()  # the store answers again: the entry was never damaged
    _assert_intact(reader)
    _assert_intact(store)


@pytest.mark.parametrize("fault", FAULTS)
def test_stats_and_gc_under_a_failed_read_remove_nothing(flaky, fault):
    store, faults = flaky
    store.touch(KEY, time.time() - 40 * DAY)  # old enough for gc, were its manifest taken as damaged or absent
    before = _listing(store)
    faults[MANIFEST] = fault()
    with pytest.raises(StoreError, match=KEY[:12]):
        store.stats()
    with pytest.raises(StoreError, match=KEY[:12]):
        store.gc()
    with pytest.raises(StoreError, match=KEY[:12]):
        store.gc(older_than_s=DAY, max_bytes=0)
    assert _listing(store) == before
    faults.clear()
    s = store.stats()
    assert (s.entries, s.damaged) == (1, 0)
    assert store.gc().removed == []  # the scan never classified it as damaged
    _assert_intact(store)


@pytest.mark.parametrize("fault", FAULTS)
def test_gc_stops_if_a_damaged_entry_cannot_be_read_again(flaky, monkeypatch, fault):
    """Between the scan and the removal, gc re-reads a damaged manifest (a writer may have replaced it):
    a read that fails there stops gc, and says how far it got."""
    store, faults = flaky
    fs, path = _stored(store, MANIFEST)
    fs.pipe_file(path, b'{"files": ')
    scan = store._scan

    def scan_then_fault():
        found = scan()
        faults[MANIFEST] = fault()
        return found

    monkeypatch.setattr(store, "_scan", scan_then_fault)
    with pytest.raises(StoreError, match=rf"stopped after removing 0 of 1 item\(s\).*{KEY[:12]}"):
        store.gc()
    faults.clear()
    assert fs.cat_file(path) == b'{"files": '  # still there: nothing was proven at removal time
    assert store.get(KEY) is None and not fs.exists(path)  # once readable, proven damage is removed


def test_a_remote_backend_error_of_its_own_kind_removes_nothing(tmp_path, monkeypatch):
    """An fsspec backend may raise its own exceptions (botocore, aiohttp): only FileNotFoundError is proof."""

    class SlowDown(Exception):
        pass

    monkeypatch.setattr(FlakyMemoryFileSystem, "faults", {})
    monkeypatch.setattr(FlakyMemoryFileSystem, "store", {})
    store = open_store(f"flakymem://anim-test-{uuid.uuid4().hex[:12]}", local_cache=tmp_path / "rt")
    _write(store, KEY, "clip", {"clip.mp4": b"x" * 1000, "sub.srt": b"s" * 20})
    before = _listing(store)
    for name in (MANIFEST, "clip.mp4"):
        FlakyMemoryFileSystem.faults[name] = SlowDown("503 Slow Down")
        with pytest.raises(StoreError, match=rf"{KEY[:12]}.*SlowDown"):
            _fresh_reader(store, tmp_path).get(KEY)
        FlakyMemoryFileSystem.faults.clear()
    assert _listing(store) == before
    _assert_intact(_fresh_reader(store, tmp_path))


def test_an_unreadable_use_marker_does_not_make_an_entry_old(tmp_path, monkeypatch):
    """A remote entry's last use is in ``used``; if it cannot be read, gc must not fall back to the
    creation time and remove a recently used entry by age."""
    monkeypatch.setattr(FlakyMemoryFileSystem, "faults", {})
    monkeypatch.setattr(FlakyMemoryFileSystem, "store", {})
    store = open_store(f"flakymem://anim-test-{uuid.uuid4().hex[:12]}", local_cache=tmp_path / "rt")
    _write(store, KEY, "clip", {"clip.mp4": b"x"})
    fs, path = _stored(store, MANIFEST)
    manifest = json.loads(fs.cat_file(path))
    manifest["created"] = time.time() - 40 * DAY  # made long ago, used just now
    fs.pipe_file(path, json.dumps(manifest).encode())
    store.touch(KEY)
    FlakyMemoryFileSystem.faults[USED] = TimeoutError("the read timed out")
    with pytest.raises(StoreError, match=rf"{KEY[:12]}.*{USED}"):
        store.gc(older_than_s=DAY)
    FlakyMemoryFileSystem.faults.clear()
    assert store.gc(older_than_s=DAY).removed == [] and store.get(KEY) is not None
