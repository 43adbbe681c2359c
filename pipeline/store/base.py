"""What every artifact store does, whatever its layout: ``Store``, the base of both layouts.

A layout (``local.py``, ``remote.py``) implements reading (``get``, ``meta``, ``touch``), the
last step of a write (``_commit``: staged files become the artifact, manifest last), the
three hooks collection needs (``_scan``, ``_remove_entry``, ``_remove_leftover``) and notes
(small records beside the artifacts, keyed by a content key: leases and spend, see
``lease.py``). Staging a write, ``stats`` and ``gc`` are written once, here, from what
``_scan`` reports.
"""
from __future__ import annotations

import shutil
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

from pipeline.store.manifest import (NAME_RE, STALE_S, GcItem, GcReport, StageUsage, StoreError, StoreStats,
                                     check_key, parse_manifest, write_id)

NOTES = ".notes"  # ROOT/.notes/<kind>/<key[:2]>/<key>/<name>: beside the artifacts, never one of them


@dataclass(frozen=True)
class Entry:
    """An entry a scan found with a well-formed manifest."""

    key: str
    stage: str
    bytes: int
    last_used: float


@dataclass(frozen=True)
class Leftover:
    """Something a scan found that is not an entry: a damaged entry, or staging files without a manifest."""

    path: str
    kind: Literal["damaged", "staging"]
    bytes: int
    mtime: float
    key: str | None = None


def open_fs(location: str):
    """``(filesystem, root)`` of an fsspec URL; fsspec is imported only when a URL is opened."""
    from fsspec.core import url_to_fs

    try:
        return url_to_fs(location)
    except (ImportError, ValueError) as exc:
        raise StoreError(f"artifact store {location!r} cannot be opened: {exc}") from None


def check_note(kind: str, key: str, name: str) -> None:
    """Refuse a note address that is not a key and two plain names (they become a path)."""
    check_key(key)
    for part in (kind, name):
        if not isinstance(part, str) or not NAME_RE.fullmatch(part) or part.startswith("."):
            raise StoreError(f"note {kind!r}/{name!r} of {key[:12]}: a note's kind and name are plain file names")


def local_path(location: str | Path) -> Path | None:
    """The local directory ``location`` names (a path or a ``file://`` URL), or None for a remote URL."""
    if isinstance(location, Path) or ("://" not in location and "::" not in location):
        return Path(location)
    from fsspec.implementations.local import LocalFileSystem

    fs, root = open_fs(location)
    return Path(root) if isinstance(fs, LocalFileSystem) else None


class Store(ABC):
    """Artifacts addressed by content key; open one with :func:`pipeline.store.open_store`.

    ``open_store(store.url)`` opens the same store in another process. Reads return None only
    for an artifact that is absent or proven damaged (the damaged one is removed); a read that
    fails for any other reason raises :class:`StoreError` and removes nothing.
    """

    url: str

    # ---- reading (each layout)
    @abstractmethod
    def get(self, key: str) -> dict[str, Path] | None:
        """The artifact's files (local paths) if it exists intact, else None; a damaged one is removed.

        Raises StoreError, and removes nothing, if the store cannot be read right now.
        """

    def meta(self, key: str) -> dict:
        """The ``meta`` the artifact was written with."""
        raw = self._read_manifest(key)
        if raw is None:
            raise StoreError(f"no artifact {key[:12]} in {self.url}")
        try:
            return parse_manifest(raw, key).get("meta", {})
        except ValueError as exc:
            raise StoreError(f"artifact {key[:12]} in {self.url}: its manifest is damaged ({exc}); "
                             "nothing was removed (get removes it)") from None

    @abstractmethod
    def _read_manifest(self, key: str) -> bytes | None:
        """The manifest's bytes, None if there is none; StoreError if it cannot be read now."""

    @abstractmethod
    def touch(self, key: str, when: float | None = None) -> None:
        """Record a use of ``key`` at epoch ``when`` (now by default)."""

    # ---- writing
    @contextmanager
    def writer(self, key: str, meta: dict | None = None) -> Iterator[Path]:
        """Context manager yielding a local staging directory; on success its files become ``key``.

        ``meta["stage"]``, when given, is recorded for ``stats``/``gc``. If the body raises,
        nothing is stored. If another writer completes ``key`` first, its artifact is kept
        and this one is discarded.
        """
        check_key(key)
        staging = self._staging_root() / write_id()
        staging.mkdir(parents=True)
        try:
            yield staging
            self._commit(key, staging, meta)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @abstractmethod
    def _staging_root(self) -> Path:
        """Local folder where writes are staged."""

    @abstractmethod
    def _commit(self, key: str, staging: Path, meta: dict | None) -> None:
        """Make the staged files the artifact ``key``, manifest last; lose quietly to a finished one."""

    # ---- notes (each layout): small records keyed by a content key, e.g. ``leases`` and ``spend``.
    # A note is not an artifact: no manifest, no checksum, not counted by ``stats`` nor removed by
    # ``gc``. Notes of a key may exist while its artifact does not (and the reverse).
    @abstractmethod
    def create_note(self, kind: str, key: str, name: str, data: bytes) -> bool:
        """Write the note only if it does not exist yet; True if this call created it. Atomic on a
        local store (one of two racing creators wins); on a remote store as atomic as the
        filesystem's conditional put."""

    @abstractmethod
    def write_note(self, kind: str, key: str, name: str, data: bytes) -> None:
        """Create or replace the note (a reader sees the old content or the new, never half)."""

    @abstractmethod
    def read_note(self, kind: str, key: str, name: str) -> bytes | None:
        """The note's bytes, None if there is none; StoreError if the store cannot answer."""

    @abstractmethod
    def notes(self, kind: str, key: str) -> list[str]:
        """The names of ``key``'s notes of ``kind`` (sorted; none if there are none)."""

    @abstractmethod
    def remove_note(self, kind: str, key: str, name: str) -> None:
        """Remove the note (gone already is fine)."""

    # ---- collection (each layout)
    @abstractmethod
    def _scan(self) -> tuple[list[Entry], list[Leftover]]:
        """Every entry and leftover, from the manifests; StoreError if one cannot be read."""

    @abstractmethod
    def _remove_entry(self, key: str) -> None:
        """Remove an entry (gone already is fine)."""

    @abstractmethod
    def _remove_leftover(self, item: Leftover) -> None:
        """Remove a leftover, unless a writer has completed the entry since the scan."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    # ---- shared by both layouts: numbers and collection from the manifests
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
        size limit; run a tight ``max_bytes`` between renders. If a manifest cannot be read, gc
        raises StoreError: before removing anything if the scan hit it, else saying what it removed.
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
        doomed: list[tuple[Entry, Literal["age", "size"]]] = []
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

        # 4. Remove; a layout re-reads a damaged entry's manifest first, and that read may fail.
        if not dry_run:
            done = 0
            try:
                for x in junk:
                    self._remove_leftover(x)
                    done += 1
                for e, _ in doomed:
                    self._remove_entry(e.key)
                    done += 1
            except StoreError as exc:
                raise StoreError(f"gc of {self.url} stopped after removing {done} of {len(removed)} "
                                 f"item(s): {exc}") from exc
        return GcReport(location=self.url, dry_run=dry_run, removed=removed,
                        bytes_freed=sum(item.bytes for item in removed), entries_left=len(live),
                        bytes_left=sum(e.bytes for e in live))
