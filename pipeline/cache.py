"""Content-addressed artifact store on a local directory or any fsspec filesystem.

Every node's output lives under its content key, with a ``manifest.json`` naming each file
with its size and sha256. A manifest whose checksums hold is the only proof that an
artifact exists; anything else (a missing or unreadable manifest, a missing file, a wrong
size or checksum) is treated as absent and removed, so it is recomputed, never used.

``ArtifactStore(location)`` opens one of two layouts, chosen by the location:

* **Local** (a path or ``file://`` URL): ``ROOT/ab/abcdef…/{files, manifest.json}``. Files
  are staged in ``ROOT/.staging/<write>/``, the manifest is written last, and the directory
  is renamed into place in one step. A hit touches the manifest's mtime: that is its last use.
* **Remote** (``s3://``, ``oss://``, ``memory://`` …): ``PREFIX/ab/abcdef…/<write>/<files>``,
  then ``PREFIX/ab/abcdef…/manifest.json`` created last (a conditional put where the
  filesystem has one), then ``used`` (the epoch of the last use, rewritten at most once an
  hour per key and machine). Each write uploads under its own ``<write>`` prefix
  (``<epoch>-<random>``), so two writers of one key never overwrite each other's files; the
  manifest names the one upload that counts. ``get`` downloads into a local read-through
  cache and checks every copy against the manifest.

``stats()`` and ``gc()`` read the manifests only (no database): stage, size, creation and
last use are all recorded there or beside it.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

from pydantic import Field

from stages.records import AnimError
from stages.records import Record

SCHEMA = "anim.artifact/2"  # manifests without "schema" are version 1: files and meta only
MANIFEST = "manifest.json"
USED = "used"
STAGING = ".staging"
STALE_S = 3600.0  # staging leftovers and orphaned uploads older than this are garbage
USED_EVERY_S = 3600.0  # a remote store records a key's use at most this often per machine

_KEY = re.compile(r"[0-9a-f]{8,128}")
_NAME = re.compile(r"[^/\\\x00]+")


class StoreError(AnimError):
    """An artifact store that cannot be opened, or a write that the store must refuse."""


# --------------------------------------------------------------------------- records


class StageUsage(Record):
    entries: int = 0
    bytes: int = 0


class StoreStats(Record):
    """What the store holds, from its manifests (checksums are not re-read)."""

    location: str
    entries: int
    bytes: int = Field(description="Sum of the artifacts' file sizes.")
    by_stage: dict[str, StageUsage]
    oldest_use: float | None = Field(description="Epoch of the least recently used entry's last use.")
    newest_use: float | None
    damaged: int = Field(description="Entries whose manifest is missing or unreadable.")
    staging: int = Field(description="Leftover staging directories and uploads without a manifest.")
    staging_bytes: int


class GcItem(Record):
    what: str = Field(description="The content key, or the path of a leftover.")
    reason: Literal["age", "size", "damaged", "staging"]
    stage: str | None = None
    bytes: int
    last_used: float | None = None


class GcReport(Record):
    location: str
    dry_run: bool
    removed: list[GcItem] = Field(description="What was removed, or would be with dry_run.")
    bytes_freed: int
    entries_left: int
    bytes_left: int


@dataclass(frozen=True)
class _Entry:
    key: str
    stage: str
    bytes: int
    last_used: float


@dataclass(frozen=True)
class _Leftover:
    path: str
    kind: Literal["damaged", "staging"]
    bytes: int
    mtime: float
    key: str | None = None


# --------------------------------------------------------------------------- shared helpers


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _intact(path: Path, entry: dict) -> bool:
    try:
        return path.stat().st_size == entry["size"] and _sha256(path) == entry["sha256"]
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return False


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise StoreError(f"artifact key {key!r} is not a lowercase hex content key")


def _write_id() -> str:
    return f"{int(time.time())}-{uuid.uuid4().hex[:12]}"


def _write_time(write: str) -> float:
    """When a write id was made; a name that is not one is as old as can be."""
    head = write.split("-", 1)[0]
    return float(head) if head.isdigit() else 0.0


def _manifest(key: str, folder: Path, meta: dict | None, write: str | None = None) -> dict:
    """The manifest of the files a stage left in ``folder`` (flat: files only)."""
    files = {}
    for p in sorted(folder.iterdir()):
        if p.name == MANIFEST:
            raise StoreError(f"artifact {key[:12]}: a stage wrote {MANIFEST}, a name the store reserves; "
                             "nothing was stored")
        if not p.is_file():
            raise StoreError(f"artifact {key[:12]}: {p.name} is not a regular file; an artifact is a flat "
                             "set of files; nothing was stored")
        files[p.name] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    meta = dict(meta or {})
    manifest = {"schema": SCHEMA, "key": key, "stage": str(meta.get("stage", "unknown")),
                "created": time.time(), "bytes": sum(e["size"] for e in files.values()),
                "files": files, "meta": meta}
    if write is not None:
        manifest["write"] = write
    return manifest


def _dump(manifest: dict) -> bytes:
    return json.dumps(manifest, indent=1, ensure_ascii=False).encode("utf-8")


def _parse(raw: bytes, key: str) -> dict:
    """A manifest's content, or ValueError if it is not a well-formed manifest of ``key``."""
    manifest = json.loads(raw)  # JSONDecodeError and UnicodeDecodeError are ValueErrors
    if not isinstance(manifest, dict) or manifest.get("key", key) != key:
        raise ValueError("not a manifest of this key")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ValueError("manifest has no file table")
    for name, entry in files.items():
        if (not _NAME.fullmatch(name) or name in (".", "..", MANIFEST) or not isinstance(entry, dict)
                or not isinstance(entry.get("size"), int) or not isinstance(entry.get("sha256"), str)):
            raise ValueError(f"bad file entry {name!r}")
    return manifest


def _stage_and_bytes(manifest: dict) -> tuple[str, int]:
    stage = manifest.get("stage") or manifest.get("meta", {}).get("stage") or "unknown"
    size = manifest.get("bytes")
    if not isinstance(size, int):  # a version-1 manifest
        size = sum(e["size"] for e in manifest["files"].values())
    return str(stage), size


def _tree(path: Path) -> tuple[int, float]:
    """Bytes under ``path`` and its latest mtime (a writer still at work keeps it fresh)."""
    size, latest = 0, path.stat().st_mtime
    for base, _dirs, names in os.walk(path):
        for name in names:
            try:
                st = os.stat(os.path.join(base, name))
            except FileNotFoundError:
                continue
            size, latest = size + st.st_size, max(latest, st.st_mtime)
    return size, latest


def _default_local_cache() -> Path:
    # A per-machine location for downloaded copies, not a setting that changes any result,
    # so it is found here rather than resolved at the entry point (workers build stores too).
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "anim-pipeline" / "remote"


def _open_fs(location: str):
    from fsspec.core import url_to_fs

    try:
        return url_to_fs(location)
    except (ImportError, ValueError) as exc:
        raise StoreError(f"artifact store {location!r} cannot be opened: {exc}") from None


def _is_local(location: str | Path) -> bool:
    if isinstance(location, Path) or ("://" not in location and "::" not in location):
        return True
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(_open_fs(location)[0], LocalFileSystem)


# --------------------------------------------------------------------------- the store


class ArtifactStore:
    """Artifacts addressed by content key, in a local directory or under an fsspec URL.

    ``ArtifactStore(location)`` returns a :class:`LocalStore` for a path or ``file://`` URL
    and a :class:`RemoteStore` for any other fsspec URL; ``ArtifactStore(store.url)`` opens
    the same store in another process.
    """

    url: str

    def __new__(cls, location: str | Path | None = None, **kwargs):
        if cls is ArtifactStore:
            if location is None:
                raise StoreError("an artifact store needs a location: a path or an fsspec URL")
            if _is_local(location):
                cls = LocalStore
            else:
                from pipeline.remote_store import RemoteStore  # fsspec only when a remote store is used

                cls = RemoteStore
        return super().__new__(cls)

    # Each layout implements these.
    def get(self, key: str) -> dict[str, Path] | None:
        """The artifact's files (local paths) if it exists intact, else None; a damaged one is removed."""
        raise NotImplementedError

    def meta(self, key: str) -> dict:
        """The ``meta`` the artifact was written with."""
        raise NotImplementedError

    @contextmanager
    def writer(self, key: str, meta: dict | None = None) -> Iterator[Path]:
        """Context manager yielding a local staging directory; on success its files become ``key``.

        ``meta["stage"]``, when given, is recorded for ``stats``/``gc``. If the body raises,
        nothing is stored. If another writer completes ``key`` first, its artifact is kept
        and this one is discarded.
        """
        _check_key(key)
        staging = self._staging_root() / _write_id()
        staging.mkdir(parents=True)
        try:
            yield staging
            self._commit(key, staging, meta)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _staging_root(self) -> Path:
        """Local folder where writes are staged."""
        raise NotImplementedError

    def _commit(self, key: str, staging: Path, meta: dict | None) -> None:
        """Make the staged files the artifact ``key``, manifest last; lose quietly to a finished one."""
        raise NotImplementedError

    def touch(self, key: str, when: float | None = None) -> None:
        """Record a use of ``key`` at epoch ``when`` (now by default)."""
        raise NotImplementedError

    def _scan(self) -> tuple[list[_Entry], list[_Leftover]]:
        raise NotImplementedError

    def _remove_entry(self, key: str) -> None:
        raise NotImplementedError

    def _remove_leftover(self, item: _Leftover) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    # Shared by both layouts: numbers and collection from the manifests.
    def stats(self) -> StoreStats:
        """Entries and bytes per stage, last-use range, damaged entries and staging leftovers."""
        entries, leftovers = self._scan()
        by_stage: dict[str, StageUsage] = {}
        for e in entries:
            u = by_stage.get(e.stage, StageUsage())
            by_stage[e.stage] = StageUsage(entries=u.entries + 1, bytes=u.bytes + e.bytes)
        uses = [e.last_used for e in entries]
        staging = [x for x in leftovers if x.kind == "staging"]
        return StoreStats(location=self.url, entries=len(entries), bytes=sum(e.bytes for e in entries),
                          by_stage=dict(sorted(by_stage.items())), oldest_use=min(uses, default=None),
                          newest_use=max(uses, default=None),
                          damaged=sum(x.kind == "damaged" for x in leftovers),
                          staging=len(staging), staging_bytes=sum(x.bytes for x in staging))

    def gc(self, *, older_than_s: float | None = None, max_bytes: int | None = None,
           dry_run: bool = False) -> GcReport:
        """Remove leftovers, then entries unused for ``older_than_s``, then the least recently used
        until the store holds at most ``max_bytes``.

        Leftovers are damaged entries and staging directories or uploads untouched for an hour.
        Only entries with a complete manifest are candidates, so a write in progress is never
        removed. An entry in use by a render that started before gc may still be removed by the
        size limit; run a tight ``max_bytes`` between renders.
        """
        if older_than_s is not None and older_than_s < 0:
            raise StoreError(f"gc: older_than_s must be >= 0, got {older_than_s}")
        if max_bytes is not None and max_bytes < 0:
            raise StoreError(f"gc: max_bytes must be >= 0, got {max_bytes}")
        now = time.time()
        entries, leftovers = self._scan()
        removed: list[GcItem] = []

        # 1. Damaged entries always; staging leftovers once stale.
        junk = [x for x in leftovers if x.kind == "damaged" or now - x.mtime > STALE_S]
        removed += [GcItem(what=x.key or x.path, reason=x.kind, bytes=x.bytes, last_used=x.mtime) for x in junk]

        # 2. Entries unused for longer than older_than_s.
        live = sorted(entries, key=lambda e: e.last_used)
        doomed: list[tuple[_Entry, Literal["age", "size"]]] = []
        if older_than_s is not None:
            doomed += [(e, "age") for e in live if now - e.last_used > older_than_s]
            live = [e for e in live if now - e.last_used <= older_than_s]

        # 3. Least recently used first until under max_bytes.
        if max_bytes is not None:
            total = sum(e.bytes for e in live)
            while live and total > max_bytes:
                e = live.pop(0)
                total -= e.bytes
                doomed.append((e, "size"))
        removed += [GcItem(what=e.key, reason=why, stage=e.stage, bytes=e.bytes, last_used=e.last_used)
                    for e, why in doomed]

        if not dry_run:
            for x in junk:
                self._remove_leftover(x)
            for e, _ in doomed:
                self._remove_entry(e.key)
        return GcReport(location=self.url, dry_run=dry_run, removed=removed,
                        bytes_freed=sum(item.bytes for item in removed), entries_left=len(live),
                        bytes_left=sum(e.bytes for e in live))


class LocalStore(ArtifactStore):
    """A local directory; artifacts are used in place."""

    def __init__(self, location: str | Path, *, local_cache: str | Path | None = None):
        # local_cache is accepted so callers need not know the layout; a local store needs none.
        if isinstance(location, str) and ("://" in location or "::" in location):
            location = _open_fs(location)[1]
        self.root = Path(location).expanduser().resolve()
        (self.root / STAGING).mkdir(parents=True, exist_ok=True)
        self.url = str(self.root)

    def path(self, key: str) -> Path:
        _check_key(key)
        return self.root / key[:2] / key

    def get(self, key: str) -> dict[str, Path] | None:
        folder = self.path(key)
        try:
            manifest = _parse((folder / MANIFEST).read_bytes(), key)
        except FileNotFoundError:
            # Files without a manifest: an interrupted or foreign write. Checked again, since
            # a writer may have renamed a complete entry into place since the read above.
            if folder.exists() and not (folder / MANIFEST).exists():
                self._discard(folder)
            return None
        except (ValueError, OSError):
            self._discard(folder)
            return None
        files = {name: folder / name for name in manifest["files"]}
        if not all(_intact(files[name], entry) for name, entry in manifest["files"].items()):
            self._discard(folder)
            return None
        try:
            os.utime(folder / MANIFEST)  # the manifest's mtime is the entry's last use
        except OSError:
            pass  # a read-only store still serves hits; it just cannot record them
        return files

    def meta(self, key: str) -> dict:
        try:
            return json.loads((self.path(key) / MANIFEST).read_bytes()).get("meta", {})
        except FileNotFoundError:
            raise StoreError(f"no artifact {key[:12]} in {self.url}") from None

    def touch(self, key: str, when: float | None = None) -> None:
        when = time.time() if when is None else when
        try:
            os.utime(self.path(key) / MANIFEST, (when, when))
        except FileNotFoundError:
            raise StoreError(f"no artifact {key[:12]} in {self.url}") from None

    def _staging_root(self) -> Path:
        return self.root / STAGING

    def _commit(self, key: str, staging: Path, meta: dict | None) -> None:
        (staging / MANIFEST).write_bytes(_dump(_manifest(key, staging, meta)))
        final = self.path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                os.replace(staging, final)  # one step; refused if another writer's entry is there
                return
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            if self.get(key) is not None:
                return  # another writer finished first: theirs wins, ours is discarded
            # get() removed a damaged entry in the way; try again
        raise StoreError(f"artifact {key[:12]}: could not move the new entry into {final}; it was discarded")

    def _discard(self, folder: Path) -> None:
        """Take an entry out of the store in one step (readers never see half of it), then delete it."""
        trash = self.root / STAGING / f"{_write_id()}.discard"
        try:
            os.replace(folder, trash)
        except FileNotFoundError:
            return  # someone else removed it
        shutil.rmtree(trash, ignore_errors=True)

    def _scan(self) -> tuple[list[_Entry], list[_Leftover]]:
        entries: list[_Entry] = []
        leftovers: list[_Leftover] = []
        for d in sorted((self.root / STAGING).iterdir()):
            try:
                size, mtime = _tree(d)
            except FileNotFoundError:
                continue  # a writer just committed or cleaned up
            leftovers.append(_Leftover(str(d), "staging", size, mtime))
        for prefix in sorted(self.root.iterdir()):
            if len(prefix.name) != 2 or not prefix.is_dir():
                continue
            for folder in sorted(prefix.iterdir()):
                if not _KEY.fullmatch(folder.name):
                    continue
                try:
                    manifest_path = folder / MANIFEST
                    manifest = _parse(manifest_path.read_bytes(), folder.name)
                    last_used = manifest_path.stat().st_mtime
                except (ValueError, OSError):  # no manifest, or an unreadable one
                    try:
                        size, mtime = _tree(folder)
                    except FileNotFoundError:
                        continue  # removed while we looked
                    leftovers.append(_Leftover(str(folder), "damaged", size, mtime, folder.name))
                    continue
                stage, size = _stage_and_bytes(manifest)
                entries.append(_Entry(folder.name, stage, size, last_used))
        return entries, leftovers

    def _remove_entry(self, key: str) -> None:
        self._discard(self.path(key))

    def _remove_leftover(self, item: _Leftover) -> None:
        path = Path(item.path)
        if item.kind == "damaged":
            try:  # a writer may have renamed a complete entry into place since the scan
                _parse((path / MANIFEST).read_bytes(), path.name)
                return
            except (ValueError, OSError):
                self._discard(path)
        else:
            shutil.rmtree(path, ignore_errors=True)


def __getattr__(name: str):
    if name == "RemoteStore":  # re-exported lazily: ``from pipeline.cache import RemoteStore`` keeps working
        from pipeline.remote_store import RemoteStore

        return RemoteStore
    raise AttributeError(name)
