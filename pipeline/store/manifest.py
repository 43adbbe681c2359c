"""The manifest: the one proof that an artifact exists, and the records the store reports.

A manifest is ``manifest.json`` beside (or above) an artifact's files::

    {"schema": "anim.artifact/2", "key": "<content key>", "stage": "keyframes",
     "created": <epoch>, "bytes": <sum of sizes>, "write": "<epoch>-<random>",   # remote only
     "files": {"<name>": {"size": <int>, "sha256": "<hex>"}, ...}, "meta": {...}}

Manifests without ``schema`` are version 1 (``files`` and ``meta`` only) and still read.
Everything here is pure or reads local files only; both layouts (``local.py``, ``remote.py``)
and the base class (``base.py``) build on it.

What counts as proof of damage is decided here, once: :func:`parse_manifest` raises
``ValueError`` for content that is not a well-formed manifest of the key, and :func:`intact`
answers False for a file that is missing or has the wrong size or checksum. Any other error
while reading (EIO, a permission, a timeout) proves nothing: :func:`unreadable` turns it into
the :class:`StoreError` each layout raises, and nothing is deleted.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from pathlib import Path
from typing import Literal

from pydantic import Field

from stages.records import AnimError
from stages.records import Record

SCHEMA = "anim.artifact/2"  # manifests without "schema" are version 1: files and meta only
MANIFEST = "manifest.json"
USED = "used"
STAGING = ".staging"
STALE_S = 3600.0  # staging leftovers and orphaned uploads older than this are garbage
USED_EVERY_S = 3600.0  # a remote store records a key's use at most this often per machine

KEY_RE = re.compile(r"[0-9a-f]{8,128}")  # a content key (sha256 hex, or a shorter test key)
NAME_RE = re.compile(r"[^/\\\x00]+")  # a file name inside an artifact, or a write id

# A local file that is absent, or a path whose shape is wrong (a file where a folder should
# be, or the reverse): proof that the entry is not there, unlike any other OSError.
MISSING = (FileNotFoundError, NotADirectoryError, IsADirectoryError)


class StoreError(AnimError):
    """An artifact store that cannot be opened or read, or a write that the store must refuse."""


def unreadable(location: str, key: str, what: str, exc: BaseException) -> StoreError:
    """The error for a read that failed without proving anything (raise it ``from exc``)."""
    return StoreError(f"artifact {key[:12]} in {location}: cannot read {what} ({type(exc).__name__}: {exc}); "
                      "nothing was removed, the entry may be intact: retry once the store answers")


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
    damaged: int = Field(description="Entries whose manifest is missing or ill-formed.")
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


# --------------------------------------------------------------------------- keys, files, write ids


def check_key(key: str) -> None:
    """Refuse anything but a lowercase hex content key (it becomes a path)."""
    if not isinstance(key, str) or not KEY_RE.fullmatch(key):
        raise StoreError(f"artifact key {key!r} is not a lowercase hex content key")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def intact(path: Path, entry: dict) -> bool:
    """Whether the local file ``path`` is the one a manifest ``entry`` names.

    False only on proof: the file is missing or its size or checksum differs. Any other
    OSError (the file could not be read) propagates: the caller raises :func:`unreadable`.
    """
    try:
        return path.stat().st_size == entry["size"] and sha256_file(path) == entry["sha256"]
    except MISSING:
        return False


def write_id() -> str:
    """A fresh id for one write: ``<epoch>-<random>``, so its age can be read from its name."""
    return f"{int(time.time())}-{uuid.uuid4().hex[:12]}"


def write_time(write: str) -> float:
    """When a write id was made; a name that is not one is as old as can be."""
    head = write.split("-", 1)[0]
    return float(head) if head.isdigit() else 0.0


# --------------------------------------------------------------------------- manifests


def build_manifest(key: str, folder: Path, meta: dict | None, write: str | None = None) -> dict:
    """The manifest of the files a stage left in ``folder`` (flat: files only)."""
    files = {}
    for p in sorted(folder.iterdir()):
        if p.name == MANIFEST:
            raise StoreError(f"artifact {key[:12]}: a stage wrote {MANIFEST}, a name the store reserves; "
                             "nothing was stored")
        if not p.is_file():
            raise StoreError(f"artifact {key[:12]}: {p.name} is not a regular file; an artifact is a flat "
                             "set of files; nothing was stored")
        files[p.name] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    meta = dict(meta or {})
    manifest = {"schema": SCHEMA, "key": key, "stage": str(meta.get("stage", "unknown")),
                "created": time.time(), "bytes": sum(e["size"] for e in files.values()),
                "files": files, "meta": meta}
    if write is not None:
        manifest["write"] = write
    return manifest


def dump_manifest(manifest: dict) -> bytes:
    return json.dumps(manifest, indent=1, ensure_ascii=False).encode("utf-8")


def parse_manifest(raw: bytes, key: str) -> dict:
    """A manifest's content, or ValueError if it is not a well-formed manifest of ``key``."""
    manifest = json.loads(raw)  # JSONDecodeError and UnicodeDecodeError are ValueErrors
    if not isinstance(manifest, dict) or manifest.get("key", key) != key:
        raise ValueError("not a manifest of this key")
    if not isinstance(manifest.get("meta", {}), dict):
        raise ValueError("manifest meta is not a table")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ValueError("manifest has no file table")
    for name, entry in files.items():
        if (not NAME_RE.fullmatch(name) or name in (".", "..", MANIFEST) or not isinstance(entry, dict)
                or not isinstance(entry.get("size"), int) or not isinstance(entry.get("sha256"), str)):
            raise ValueError(f"bad file entry {name!r}")
    return manifest


def stage_and_bytes(manifest: dict) -> tuple[str, int]:
    """The stage a parsed manifest records and its artifact's size (summed for version 1)."""
    stage = manifest.get("stage") or manifest.get("meta", {}).get("stage") or "unknown"
    size = manifest.get("bytes")
    if not isinstance(size, int):  # a version-1 manifest
        size = sum(e["size"] for e in manifest["files"].values())
    return str(stage), size
