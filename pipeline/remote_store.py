"""The artifact store on a remote fsspec filesystem (s3://, oss://, memory:// …).

Split from ``pipeline.cache`` (the layout, manifests and the local store) because only a
cluster needs it. Writes upload each file under the write's own prefix, then create the
manifest with an exclusive create; reads go through a local, checksum-verified copy.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path

from pipeline.cache import (MANIFEST, STAGING, USED, USED_EVERY_S, _KEY, _NAME, ArtifactStore, StoreError, _check_key,
                            _default_local_cache, _dump, _Entry, _intact, _Leftover, _manifest, _open_fs, _parse,
                            _stage_and_bytes, _write_id, _write_time)


class RemoteStore(ArtifactStore):
    """An fsspec filesystem (s3://, oss://, memory:// …) with a local read-through cache.

    Credentials and endpoints come from the filesystem's own configuration (environment,
    config files), since ``url`` is all another process gets.
    """

    def __init__(self, location: str, *, local_cache: str | Path | None = None):
        self.fs, root = _open_fs(location)
        self._root = root.rstrip("/")
        self.url = location if "::" in location else self.fs.unstrip_protocol(self._root)
        base = Path(local_cache).expanduser() if local_cache is not None else _default_local_cache()
        # One folder per store, so two stores never share (or fight over) copies.
        self.local_cache = base.resolve() / hashlib.sha256(self.url.encode()).hexdigest()[:16]
        (self.local_cache / STAGING).mkdir(parents=True, exist_ok=True)

    # ---- layout
    def _key_dir(self, key: str) -> str:
        _check_key(key)
        return f"{self._root}/{key[:2]}/{key}"

    def _local_dir(self, key: str) -> Path:
        return self.local_cache / key[:2] / key

    def _read_manifest(self, key: str) -> bytes | None:
        try:
            return self.fs.cat_file(f"{self._key_dir(key)}/{MANIFEST}")
        except FileNotFoundError:
            return None

    def _rm(self, path: str) -> None:
        try:
            self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass

    # ---- reading
    def get(self, key: str) -> dict[str, Path] | None:
        kd = self._key_dir(key)
        raw = self._read_manifest(key)
        if raw is None:
            return None  # files without a manifest may be an upload in progress: gc removes them when stale
        try:
            manifest = _parse(raw, key)
            write = manifest["write"]
            if not isinstance(write, str) or not _NAME.fullmatch(write):
                raise ValueError("no write id")
        except (ValueError, KeyError):
            self._discard(key, raw)
            return None
        local = self._local_dir(key) / "files"
        local.mkdir(parents=True, exist_ok=True)
        files = {}
        for name, entry in manifest["files"].items():
            path = local / name
            if not _intact(path, entry):  # no copy here yet, or a stale or damaged one
                if not self._download(f"{kd}/{write}/{name}", path) or not _intact(path, entry):
                    path.unlink(missing_ok=True)
                    self._discard(key, raw)
                    return None
            files[name] = path
        self._note_use(key)
        return files

    def _download(self, remote: str, path: Path) -> bool:
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            self.fs.get_file(remote, str(tmp))
            os.replace(tmp, path)
            return True
        except FileNotFoundError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _note_use(self, key: str) -> None:
        """Write ``used`` at most once per USED_EVERY_S per key on this machine."""
        marker = self._local_dir(key) / USED
        try:
            if time.time() - marker.stat().st_mtime < USED_EVERY_S:
                return
        except FileNotFoundError:
            pass
        self.touch(key)

    def meta(self, key: str) -> dict:
        raw = self._read_manifest(key)
        if raw is None:
            raise StoreError(f"no artifact {key[:12]} in {self.url}")
        return json.loads(raw).get("meta", {})

    def touch(self, key: str, when: float | None = None) -> None:
        when = time.time() if when is None else when
        if self._read_manifest(key) is None:
            raise StoreError(f"no artifact {key[:12]} in {self.url}")
        self.fs.pipe_file(f"{self._key_dir(key)}/{USED}", repr(when).encode())
        marker = self._local_dir(key) / USED
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        os.utime(marker, (when, when))

    # ---- writing (ArtifactStore.writer stages locally, then calls _commit)
    def _staging_root(self) -> Path:
        return self.local_cache / STAGING

    def _commit(self, key: str, staging: Path, meta: dict | None) -> None:
        kd = self._key_dir(key)
        # 1. First complete manifest wins: do not upload next to a finished artifact.
        if self._finished(key):
            return
        # 2. Files first, under this write's own prefix, so no other manifest ever names them.
        write = _write_id()
        manifest = _manifest(key, staging, meta, write=write)
        try:
            for name in manifest["files"]:
                self.fs.put_file(str(staging / name), f"{kd}/{write}/{name}")
            # 3. The manifest last, created only if none is there (atomic where the filesystem
            #    supports conditional writes).
            won = self._create_manifest(key, _dump(manifest))
        except BaseException:
            self._rm(f"{kd}/{write}")
            raise
        # 4. A non-atomic create can still lose to a writer that finished in the same instant.
        if not won or self._write_of(self._read_manifest(key)) != write:
            self._rm(f"{kd}/{write}")
            return
        # 5. Keep the staged files as this machine's read-through copies.
        local = self._local_dir(key) / "files"
        local.mkdir(parents=True, exist_ok=True)
        for name in manifest["files"]:
            os.replace(staging / name, local / name)
        self.touch(key, manifest["created"])

    def _finished(self, key: str) -> bool:
        raw = self._read_manifest(key)
        if raw is None:
            return False
        try:
            _parse(raw, key)
            return True
        except ValueError:
            self._discard(key, raw)
            return False

    def _create_manifest(self, key: str, data: bytes) -> bool:
        path = f"{self._key_dir(key)}/{MANIFEST}"
        for _ in range(2):
            try:
                self.fs.pipe_file(path, data, mode="create")
                return True
            except FileExistsError:
                if self._finished(key):  # a readable manifest is there; an unreadable one was removed
                    return False
        return False

    @staticmethod
    def _write_of(raw: bytes | None) -> str | None:
        try:
            return json.loads(raw).get("write") if raw is not None else None
        except (ValueError, AttributeError):
            return None

    def _discard(self, key: str, raw: bytes) -> None:
        """Remove the entry whose manifest reads ``raw``, unless another writer replaced it meanwhile."""
        if self._read_manifest(key) != raw:
            return
        kd = self._key_dir(key)
        self._rm(f"{kd}/{MANIFEST}")  # first: the entry stops existing
        write = self._write_of(raw)
        if write and _NAME.fullmatch(write):
            self._rm(f"{kd}/{write}")
        shutil.rmtree(self._local_dir(key), ignore_errors=True)

    # ---- stats and gc
    def _scan(self) -> tuple[list[_Entry], list[_Leftover]]:
        listing = self.fs.find(self._root or "/", detail=True)
        groups: dict[str, dict[str, dict[str, int]]] = {}  # key -> part (manifest, used, a write) -> path -> size
        prefix = self._root + "/"
        for path, info in listing.items():
            if not path.startswith(prefix):
                continue
            rel = path[len(prefix):].split("/")
            if len(rel) < 3 or len(rel[0]) != 2 or not _KEY.fullmatch(rel[1]) or not rel[1].startswith(rel[0]):
                continue  # not ours: the store's prefix may hold other objects
            groups.setdefault(rel[1], {}).setdefault(rel[2], {})[path] = int(info.get("size") or 0)
        manifests = self._cat([f"{self._key_dir(k)}/{MANIFEST}" for k, parts in groups.items() if MANIFEST in parts])
        used = self._cat([f"{self._key_dir(k)}/{USED}" for k, parts in groups.items() if USED in parts])

        entries: list[_Entry] = []
        leftovers: list[_Leftover] = []
        for key, parts in sorted(groups.items()):
            kd = self._key_dir(key)
            raw = manifests.get(f"{kd}/{MANIFEST}")
            write = None
            if raw is not None:
                try:
                    manifest = _parse(raw, key)
                    write = manifest["write"]
                    stage, size = _stage_and_bytes(manifest)
                    try:  # the last recorded use; a missing or unreadable marker leaves the creation time
                        last = float(used[f"{kd}/{USED}"])
                    except (KeyError, ValueError):
                        last = float(manifest.get("created") or 0.0)
                    entries.append(_Entry(key, stage, size, last))
                except (ValueError, KeyError):
                    leftovers.append(_Leftover(f"{kd}/{MANIFEST}", "damaged", len(raw), time.time(), key))
            elif MANIFEST in parts:
                continue  # removed while we looked
            for part, paths in parts.items():
                if part in (MANIFEST, USED) or part == write:
                    continue
                leftovers.append(_Leftover(f"{kd}/{part}", "staging", sum(paths.values()), _write_time(part), key))
            if USED in parts and raw is None:  # a use marker left behind by a removed entry
                leftovers.append(_Leftover(f"{kd}/{USED}", "staging", 0, 0.0, key))
        return entries, leftovers

    def _cat(self, paths: list[str]) -> dict[str, bytes]:
        """Many small objects at once (concurrently on async filesystems), keyed as asked."""
        if not paths:
            return {}
        found = self.fs.cat(paths, on_error="omit")
        if not isinstance(found, dict):  # one path may come back as its bytes
            found = {paths[0]: found}
        strip = self.fs._strip_protocol
        by_canonical = {strip(p): v for p, v in found.items()}
        return {p: by_canonical[strip(p)] for p in paths if strip(p) in by_canonical}

    def _remove_entry(self, key: str) -> None:
        raw = self._read_manifest(key)
        if raw is None:
            return
        self._discard(key, raw)
        self._rm(f"{self._key_dir(key)}/{USED}")

    def _remove_leftover(self, item: _Leftover) -> None:
        if item.kind == "damaged" and item.key:
            raw = self._read_manifest(item.key)
            if raw is not None:
                self._discard(item.key, raw)
        else:
            self._rm(item.path)
