"""Content-addressed artifact store.

Every node's output lives under its content key: ``ROOT/ab/abcdef…/`` with the files and a
``manifest.json`` naming each file with its size and sha256. Writes are atomic: files are
staged in ``ROOT/.staging/<random>/``, the manifest is written last, and the directory is
renamed into place in one step. A manifest whose checksums hold is the only proof that an
artifact exists; anything else (a missing manifest, a wrong size or checksum) is treated as
absent and removed, so it is recomputed, never used.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ArtifactStore:
    """A local directory of artifacts addressed by content key."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / key

    def get(self, key: str) -> dict[str, Path] | None:
        """The artifact's files by name if it exists intact, else None (a damaged one is removed)."""
        folder = self.path(key)
        try:
            manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
            files = {name: folder / name for name in manifest["files"]}
            for name, entry in manifest["files"].items():
                if files[name].stat().st_size != entry["size"] or _sha256(files[name]) != entry["sha256"]:
                    raise ValueError(f"{name} does not match its manifest")
        except FileNotFoundError:
            if folder.exists():  # files without a manifest: an interrupted or foreign write
                shutil.rmtree(folder, ignore_errors=True)
            return None
        except (ValueError, KeyError, TypeError, OSError):
            shutil.rmtree(folder, ignore_errors=True)
            return None
        return files

    def meta(self, key: str) -> dict:
        return json.loads((self.path(key) / MANIFEST).read_text(encoding="utf-8")).get("meta", {})

    @contextmanager
    def writer(self, key: str, meta: dict | None = None) -> Iterator[Path]:
        """Yield a staging directory; on success its files become the artifact ``key``."""
        staging = self.root / ".staging" / uuid.uuid4().hex
        staging.mkdir(parents=True)
        try:
            yield staging
            entries = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
                       for p in sorted(staging.iterdir()) if p.is_file()}
            manifest = {"key": key, "files": entries, "meta": meta or {}}
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
            final = self.path(key)
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists() and self.get(key) is not None:
                return  # another worker finished the same artifact first; keep theirs
            shutil.rmtree(final, ignore_errors=True)
            os.replace(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
