"""The artifact store on an fsspec filesystem (s3://, oss://, memory:// …), for a cluster.

Layout: ``PREFIX/ab/abcdef…/<write>/<files>``, then ``PREFIX/ab/abcdef…/manifest.json``
created last (a conditional put where the filesystem has one), then ``used`` (the epoch of
the last use, rewritten at most once an hour per key and machine). Each write uploads under
its own ``<write>`` prefix (``<epoch>-<random>``), so two writers of one key never overwrite
each other's files; the manifest names the one upload that counts. ``get`` downloads into a
local read-through cache and checks every copy against the manifest.

An entry is removed only on proof that it is damaged: an ill-formed manifest, a file it
names that the filesystem reports missing (FileNotFoundError), or a copy whose size or
checksum differs. Any other failure of the filesystem (a timeout, a refused request, an
error of the backend's own kind) raises StoreError and removes nothing: on a shared store a
network hiccup must never destroy good artifacts.

fsspec is imported only when a store is opened (``base.open_fs``), never at import time.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path

from pipeline.store.base import NOTES, Entry, Leftover, Store, check_note, open_fs
from pipeline.store.manifest import (KEY_RE, MANIFEST, NAME_RE, STAGING, USED, USED_EVERY_S, StoreError,
                                     build_manifest, check_key, dump_manifest, intact, parse_manifest,
                                     stage_and_bytes, unreadable, write_id, write_time)


def _default_local_cache() -> Path:
    # A per-machine location for downloaded copies, not a setting that changes any result,
    # so it is found here rather than resolved at the entry point (workers build stores too).
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "anim-pipeline" / "remote"


def _parse(raw: bytes, key: str) -> tuple[dict, str]:
    """A remote manifest and the write it names, or ValueError if it is not a well-formed one."""
    manifest = parse_manifest(raw, key)
    write = manifest.get("write")
    if not isinstance(write, str) or not NAME_RE.fullmatch(write):
        raise ValueError("no write id")
    return manifest, write


def _well_formed(raw: bytes, key: str) -> bool:
    try:
        _parse(raw, key)
        return True
    except ValueError:
        return False


class RemoteStore(Store):
    """An fsspec filesystem (s3://, oss://, memory:// …) with a local read-through cache.

    Credentials and endpoints come from the filesystem's own configuration (environment,
    config files), since ``url`` is all another process gets.
    """

    def __init__(self, location: str, *, local_cache: str | Path | None = None):
        self.fs, root = open_fs(location)
        self._root = root.rstrip("/")
        self.url = location if "::" in location else self.fs.unstrip_protocol(self._root)
        base = Path(local_cache).expanduser() if local_cache is not None else _default_local_cache()
        # One folder per store, so two stores never share (or fight over) copies.
        self.local_cache = base.resolve() / hashlib.sha256(self.url.encode()).hexdigest()[:16]
        (self.local_cache / STAGING).mkdir(parents=True, exist_ok=True)

    # ---- layout
    def _key_dir(self, key: str) -> str:
        check_key(key)
        return f"{self._root}/{key[:2]}/{key}"

    def _local_dir(self, key: str) -> Path:
        return self.local_cache / key[:2] / key

    def _read_manifest(self, key: str) -> bytes | None:
        """The manifest's bytes; None if there is none; StoreError if the filesystem fails to answer."""
        try:
            return self.fs.cat_file(f"{self._key_dir(key)}/{MANIFEST}")
        except FileNotFoundError:
            return None
        except Exception as exc:  # any backend's own error kind: proof of nothing
            raise unreadable(self.url, key, MANIFEST, exc) from exc

    def _rm(self, path: str) -> None:
        try:
            self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass

    # ---- reading
    def get(self, key: str) -> dict[str, Path] | None:
        kd = self._key_dir(key)
        # 1. The manifest: absent means absent (an upload may be in progress: gc removes it when
        #    stale); ill-formed is proof of damage.
        raw = self._read_manifest(key)
        if raw is None:
            return None
        try:
            manifest, write = _parse(raw, key)
        except ValueError:
            self._discard(key, raw)
            return None
        # 2. Every file, from this machine's copy if it checks out, else downloaded and checked.
        local = self._local_dir(key) / "files"
        local.mkdir(parents=True, exist_ok=True)
        files = {}
        for name, entry in manifest["files"].items():
            path = local / name
            if not self._copy_intact(key, name, path, entry):  # no copy here yet, or a stale or damaged one
                if not self._download(key, name, f"{kd}/{write}/{name}", path) \
                        or not self._copy_intact(key, name, path, entry):
                    path.unlink(missing_ok=True)
                    self._discard(key, raw)
                    return None
            files[name] = path
        # 3. Record the use (at most hourly from this machine).
        self._note_use(key)
        return files

    def _copy_intact(self, key: str, name: str, path: Path, entry: dict) -> bool:
        try:
            return intact(path, entry)
        except OSError as exc:
            raise unreadable(self.url, key, f"{name} (local copy {path})", exc) from exc

    def _download(self, key: str, name: str, remote: str, path: Path) -> bool:
        """Fetch ``remote`` to ``path``; False only if the filesystem says the file is not there."""
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            self.fs.get_file(remote, str(tmp))
            os.replace(tmp, path)
            return True
        except FileNotFoundError as exc:
            # The local side can raise it too (the cache folder removed meanwhile): ask the store.
            try:
                self.fs.info(remote)
            except FileNotFoundError:
                return False
            except Exception as info_exc:
                raise unreadable(self.url, key, name, info_exc) from info_exc
            raise unreadable(self.url, key, name, exc) from exc
        except Exception as exc:
            raise unreadable(self.url, key, name, exc) from exc
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

    def touch(self, key: str, when: float | None = None) -> None:
        when = time.time() if when is None else when
        if self._read_manifest(key) is None:
            raise StoreError(f"no artifact {key[:12]} in {self.url}")
        self.fs.pipe_file(f"{self._key_dir(key)}/{USED}", repr(when).encode())
        marker = self._local_dir(key) / USED
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        os.utime(marker, (when, when))

    # ---- writing (Store.writer stages locally, then calls _commit)
    def _staging_root(self) -> Path:
        return self.local_cache / STAGING

    def _commit(self, key: str, staging: Path, meta: dict | None) -> None:
        kd = self._key_dir(key)
        # 1. First complete manifest wins: do not upload next to a finished artifact.
        if self._finished(key):
            return
        # 2. Files first, under this write's own prefix, so no other manifest ever names them.
        write = write_id()
        manifest = build_manifest(key, staging, meta, write=write)
        try:
            for name in manifest["files"]:
                self.fs.put_file(str(staging / name), f"{kd}/{write}/{name}")
            # 3. The manifest last, created only if none is there (atomic where the filesystem
            #    supports conditional writes).
            won = self._create_manifest(key, dump_manifest(manifest))
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
        """Whether a well-formed manifest is there; an ill-formed one is removed."""
        raw = self._read_manifest(key)
        if raw is None:
            return False
        if _well_formed(raw, key):
            return True
        self._discard(key, raw)
        return False

    def _create_manifest(self, key: str, data: bytes) -> bool:
        path = f"{self._key_dir(key)}/{MANIFEST}"
        for _ in range(2):
            try:
                self.fs.pipe_file(path, data, mode="create")
                return True
            except FileExistsError:
                if self._finished(key):  # a readable manifest is there; an ill-formed one was removed
                    return False
        return False

    @staticmethod
    def _write_of(raw: bytes | None) -> str | None:
        try:
            return json.loads(raw).get("write") if raw is not None else None
        except (ValueError, AttributeError):
            return None

    # ---- notes: PREFIX/.notes/<kind>/<key[:2]>/<key>/<name>
    def _note(self, kind: str, key: str, name: str | None = None) -> str:
        check_note(kind, key, name or "x")
        folder = f"{self._root}/{NOTES}/{kind}/{key[:2]}/{key}"
        return f"{folder}/{name}" if name else folder

    def _note_failed(self, kind: str, key: str, name: str, exc: BaseException) -> StoreError:
        return StoreError(f"note {kind}/{name} of {key[:12]} in {self.url}: {type(exc).__name__}: {exc}")

    def create_note(self, kind: str, key: str, name: str, data: bytes) -> bool:
        try:
            self.fs.pipe_file(self._note(kind, key, name), data, mode="create")
            return True
        except FileExistsError:
            return False
        except StoreError:
            raise
        except Exception as exc:
            raise self._note_failed(kind, key, name, exc) from exc

    def write_note(self, kind: str, key: str, name: str, data: bytes) -> None:
        try:
            self.fs.pipe_file(self._note(kind, key, name), data)
        except StoreError:
            raise
        except Exception as exc:
            raise self._note_failed(kind, key, name, exc) from exc

    def read_note(self, kind: str, key: str, name: str) -> bytes | None:
        try:
            return self.fs.cat_file(self._note(kind, key, name))
        except FileNotFoundError:
            return None
        except StoreError:
            raise
        except Exception as exc:
            raise unreadable(self.url, key, f"note {kind}/{name}", exc) from exc

    def notes(self, kind: str, key: str) -> list[str]:
        folder = self._note(kind, key)
        try:
            found = self.fs.ls(folder, detail=False)
        except FileNotFoundError:
            return []
        except Exception as exc:
            raise unreadable(self.url, key, f"notes {kind}", exc) from exc
        names = (str(p).rstrip("/").rsplit("/", 1)[-1] for p in found)
        return sorted(n for n in names if n and not n.startswith(".") and n != key)

    def remove_note(self, kind: str, key: str, name: str) -> None:
        try:
            self._rm(self._note(kind, key, name))
        except Exception as exc:
            raise self._note_failed(kind, key, name, exc) from exc

    # ---- removal
    def _discard(self, key: str, raw: bytes) -> None:
        """Remove the entry whose manifest reads ``raw``, unless another writer replaced it meanwhile."""
        if self._read_manifest(key) != raw:
            return
        kd = self._key_dir(key)
        self._rm(f"{kd}/{MANIFEST}")  # first: the entry stops existing
        write = self._write_of(raw)
        if isinstance(write, str) and NAME_RE.fullmatch(write):
            self._rm(f"{kd}/{write}")
        shutil.rmtree(self._local_dir(key), ignore_errors=True)

    # ---- stats and gc
    def _scan(self) -> tuple[list[Entry], list[Leftover]]:
        # 1. One listing, grouped by key and part (the manifest, ``used``, each write's upload).
        try:
            listing = self.fs.find(self._root or "/", detail=True)
        except FileNotFoundError:
            listing = {}  # nothing was ever written
        except Exception as exc:
            raise StoreError(f"artifact store {self.url} cannot be listed ({type(exc).__name__}: {exc}); "
                             "nothing was removed") from exc
        groups: dict[str, dict[str, dict[str, int]]] = {}  # key -> part (manifest, used, a write) -> path -> size
        prefix = self._root + "/"
        for path, info in listing.items():
            if not path.startswith(prefix):
                continue
            rel = path[len(prefix):].split("/")
            if len(rel) < 3 or len(rel[0]) != 2 or not KEY_RE.fullmatch(rel[1]) or not rel[1].startswith(rel[0]):
                continue  # not ours: the store's prefix may hold other objects
            groups.setdefault(rel[1], {}).setdefault(rel[2], {})[path] = int(info.get("size") or 0)
        # 2. Every manifest and use marker at once.
        manifests = self._cat([f"{self._key_dir(k)}/{MANIFEST}" for k, parts in groups.items() if MANIFEST in parts])
        used = self._cat([f"{self._key_dir(k)}/{USED}" for k, parts in groups.items() if USED in parts])

        # 3. Classify: a failed read is not damage, so it stops the scan (and gc) instead.
        entries: list[Entry] = []
        leftovers: list[Leftover] = []
        for key, parts in sorted(groups.items()):
            kd = self._key_dir(key)
            raw = manifests.get(f"{kd}/{MANIFEST}")
            if isinstance(raw, FileNotFoundError):
                raw = None
            elif isinstance(raw, BaseException):
                raise unreadable(self.url, key, MANIFEST, raw) from raw
            write = None
            if raw is not None:
                try:
                    manifest, write = _parse(raw, key)
                except ValueError:
                    leftovers.append(Leftover(f"{kd}/{MANIFEST}", "damaged", len(raw), time.time(), key))
                else:
                    stage, size = stage_and_bytes(manifest)
                    entries.append(Entry(key, stage, size, self._last_use(key, manifest, used.get(f"{kd}/{USED}"))))
            elif MANIFEST in parts:
                continue  # removed while we looked
            for part, paths in parts.items():
                if part in (MANIFEST, USED) or part == write:
                    continue
                leftovers.append(Leftover(f"{kd}/{part}", "staging", sum(paths.values()), write_time(part), key))
            if USED in parts and raw is None:  # a use marker left behind by a removed entry
                leftovers.append(Leftover(f"{kd}/{USED}", "staging", 0, 0.0, key))
        return entries, leftovers

    def _last_use(self, key: str, manifest: dict, marker: bytes | BaseException | None) -> float:
        """The use ``used`` records; a missing or garbled marker leaves the creation time."""
        if isinstance(marker, BaseException) and not isinstance(marker, FileNotFoundError):
            # An unknown last use must not make gc think the entry is old.
            raise unreadable(self.url, key, USED, marker) from marker
        try:
            return float(marker)
        except (TypeError, ValueError):
            return float(manifest.get("created") or 0.0)

    def _cat(self, paths: list[str]) -> dict[str, bytes | BaseException]:
        """Many small objects at once (concurrently on async filesystems), keyed as asked; a path that
        could not be read maps to its exception."""
        if not paths:
            return {}
        try:
            found = self.fs.cat(paths, on_error="return")
        except Exception as exc:  # a failure of the batch itself
            raise StoreError(f"artifact store {self.url}: cannot read {len(paths)} manifest(s) or use marker(s) "
                             f"({type(exc).__name__}: {exc}); nothing was removed") from exc
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

    def _remove_leftover(self, item: Leftover) -> None:
        if item.kind == "damaged" and item.key:
            raw = self._read_manifest(item.key)
            # A writer may have replaced the damaged manifest with a good one since the scan.
            if raw is not None and not _well_formed(raw, item.key):
                self._discard(item.key, raw)
        else:
            self._rm(item.path)
