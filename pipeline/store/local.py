"""The artifact store in a local directory (or a shared mount every node sees).

Layout: ``ROOT/ab/abcdef…/{files, manifest.json}``. A write stages its files in
``ROOT/.staging/<write>/``, writes the manifest there last, and renames the directory into
place in one step; the rename is refused if an entry is already there, so the first writer
wins. A hit touches the manifest's mtime: that is the entry's last use. Artifacts are used
in place, no copy is made.

An entry is removed only on proof that it is damaged (no manifest, an ill-formed one, a
file missing or with the wrong size or checksum); removal renames it into staging first, so
a reader never sees half of it. Any other OSError raises StoreError and removes nothing.
"""
from __future__ import annotations

import errno
import os
import shutil
import time
from pathlib import Path

from pipeline.store.base import NOTES, Entry, Leftover, Store, check_note, local_path
from pipeline.store.manifest import (KEY_RE, MANIFEST, MISSING, STAGING, StoreError, build_manifest, check_key,
                                     dump_manifest, intact, parse_manifest, stage_and_bytes, unreadable, write_id)


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


FIX = "choose another location (ANIM_STORE or `store` in the config file)"


def check_location(location: str | Path, *, create_parents: bool = True) -> Path:
    """The checks opening a local store at ``location`` makes before it creates anything; returns
    its folder, resolved. Raises StoreError naming the location: a ``~user`` that is not a user
    here, a file or a device, a path under a file, and (``create_parents=False``) a folder that
    would hold it but does not exist. Creates nothing, so it finds no read-only filesystem:
    creating the store does."""
    root = local_path(location)
    if root is None:
        raise StoreError(f"artifact store {location!r} is not a local directory; open it with open_store")
    try:
        root = root.expanduser().resolve()
    except RuntimeError:  # ~someone who is not a user here
        raise StoreError(f"artifact store {str(location)!r}: cannot expand {root.parts[0]!r} (no such user or "
                         "no home folder)") from None
    try:
        _check_location(root, create_parents)
    except OSError as exc:  # a folder on the way that cannot even be looked into
        raise StoreError(f"artifact store {root}: cannot look at it ({exc.strerror or exc}); {FIX}") from None
    return root


def _check_location(root: Path, create_parents: bool) -> None:
    """What opening a store at ``root`` may do: use a folder, or create one in a folder."""
    if root.exists() and not root.is_dir():
        raise StoreError(f"artifact store {root}: not a folder ({_kind(root)}); {FIX}")
    if root.exists():
        return
    above = root.parent
    while not above.exists():
        above = above.parent
    if not above.is_dir():
        raise StoreError(f"artifact store {root}: {above} is {_kind(above)}, not a folder; {FIX}")
    if not create_parents and above != root.parent:
        raise StoreError(f"artifact store {root}: the folder that would hold it, {root.parent}, does not exist; "
                         "create it first or fix the location (a new store is created only in an existing folder); "
                         "nothing was created")


def _kind(path: Path) -> str:
    if path.is_file():
        return "a file"
    if path.is_char_device() or path.is_block_device():
        return "a device"
    return "not a regular file or folder"


class LocalStore(Store):
    """A local directory; artifacts are used in place."""

    def __init__(self, location: str | Path, *, local_cache: str | Path | None = None, create_parents: bool = True):
        """Open (creating it if needed) the store in the folder ``location``.

        ``create_parents=False``: a new store is created only inside a folder that exists (a
        mistyped explicit location is refused instead of growing a tree of folders). Raises
        StoreError, naming the location, when it is not a folder (a file, ``/dev/null``), lies
        under a file, or cannot be created (a read-only filesystem); nothing is created then.
        An existing store on a read-only filesystem still opens: it serves hits, and a write
        into it fails as that node's error. ``local_cache`` is accepted so callers need not know
        the layout; a local store needs none.
        """
        self.root = check_location(location, create_parents=create_parents)
        self.url = str(self.root)
        try:
            (self.root / STAGING).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"artifact store {self.root}: cannot create it ({exc.strerror or exc}); "
                             "choose a writable folder (ANIM_STORE or `store` in the config file)") from None

    def path(self, key: str) -> Path:
        """The entry's directory (it may not exist)."""
        check_key(key)
        return self.root / key[:2] / key

    # ---- reading
    def get(self, key: str) -> dict[str, Path] | None:
        folder = self.path(key)
        # 1. The manifest: absent or ill-formed is proof, any other failure is not.
        try:
            raw = (folder / MANIFEST).read_bytes()
        except FileNotFoundError:
            self._discard_unfinished(key, folder)
            return None
        except (NotADirectoryError, IsADirectoryError):  # a file where the entry's folder should be, or the reverse
            self._discard(folder)
            return None
        except OSError as exc:
            raise unreadable(self.url, key, MANIFEST, exc) from exc
        try:
            manifest = parse_manifest(raw, key)
        except ValueError:
            self._discard(folder)
            return None
        # 2. Every file it names, by size and checksum.
        files = {name: folder / name for name in manifest["files"]}
        for name, entry in manifest["files"].items():
            try:
                ok = intact(files[name], entry)
            except OSError as exc:
                raise unreadable(self.url, key, name, exc) from exc
            if not ok:
                self._discard(folder)
                return None
        # 3. Record the use.
        try:
            os.utime(folder / MANIFEST)  # the manifest's mtime is the entry's last use
        except OSError:
            pass  # a read-only store still serves hits; it just cannot record them
        return files

    def _read_manifest(self, key: str) -> bytes | None:
        try:
            return (self.path(key) / MANIFEST).read_bytes()
        except MISSING:
            return None
        except OSError as exc:
            raise unreadable(self.url, key, MANIFEST, exc) from exc

    def touch(self, key: str, when: float | None = None) -> None:
        when = time.time() if when is None else when
        try:
            os.utime(self.path(key) / MANIFEST, (when, when))
        except FileNotFoundError:
            raise StoreError(f"no artifact {key[:12]} in {self.url}") from None

    # ---- writing (Store.writer stages here, then calls _commit)
    def _staging_root(self) -> Path:
        return self.root / STAGING

    def _commit(self, key: str, staging: Path, meta: dict | None) -> None:
        (staging / MANIFEST).write_bytes(dump_manifest(build_manifest(key, staging, meta)))
        final = self.path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                os.replace(staging, final)  # one step; refused if another writer's entry is there
                return
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            try:
                if self.get(key) is not None:
                    return  # another writer finished first: theirs wins, ours is discarded
            except StoreError as exc:
                raise StoreError(f"artifact {key[:12]}: an entry is already in {final} and cannot be checked; "
                                 f"the new one was discarded: {exc}") from exc
            # get() removed a damaged entry in the way; try again
        raise StoreError(f"artifact {key[:12]}: could not move the new entry into {final}; it was discarded")

    # ---- notes: ROOT/.notes/<kind>/<key[:2]>/<key>/<name>
    def _note(self, kind: str, key: str, name: str | None = None) -> Path:
        check_note(kind, key, name or "x")
        folder = self.root / NOTES / kind / key[:2] / key
        return folder / name if name else folder

    def _staged_note(self, path: Path, data: bytes) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{write_id()}.tmp")
        tmp.write_bytes(data)
        return tmp

    def create_note(self, kind: str, key: str, name: str, data: bytes) -> bool:
        path = self._note(kind, key, name)
        try:
            tmp = self._staged_note(path, data)
            try:
                os.link(tmp, path)  # one step, content and all; refused if the note exists
                return True
            except FileExistsError:
                return False
            finally:
                tmp.unlink(missing_ok=True)
        except OSError as exc:
            raise StoreError(f"note {kind}/{name} of {key[:12]} in {self.url} cannot be written "
                             f"({type(exc).__name__}: {exc})") from exc

    def write_note(self, kind: str, key: str, name: str, data: bytes) -> None:
        path = self._note(kind, key, name)
        try:
            os.replace(self._staged_note(path, data), path)
        except OSError as exc:
            raise StoreError(f"note {kind}/{name} of {key[:12]} in {self.url} cannot be written "
                             f"({type(exc).__name__}: {exc})") from exc

    def read_note(self, kind: str, key: str, name: str) -> bytes | None:
        try:
            return self._note(kind, key, name).read_bytes()
        except MISSING:
            return None
        except OSError as exc:
            raise unreadable(self.url, key, f"note {kind}/{name}", exc) from exc

    def notes(self, kind: str, key: str) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self._note(kind, key)) if not n.startswith("."))
        except MISSING:
            return []
        except OSError as exc:
            raise unreadable(self.url, key, f"notes {kind}", exc) from exc

    def remove_note(self, kind: str, key: str, name: str) -> None:
        try:
            self._note(kind, key, name).unlink(missing_ok=True)
        except OSError as exc:
            raise StoreError(f"note {kind}/{name} of {key[:12]} in {self.url} cannot be removed "
                             f"({type(exc).__name__}: {exc})") from exc

    # ---- removal
    def _discard(self, folder: Path) -> None:
        """Take an entry out of the store in one step (readers never see half of it), then delete it."""
        trash = self.root / STAGING / f"{write_id()}.discard"
        try:
            os.replace(folder, trash)
        except FileNotFoundError:
            return  # someone else removed it
        if trash.is_dir():
            shutil.rmtree(trash, ignore_errors=True)
        else:
            trash.unlink(missing_ok=True)

    def _discard_unfinished(self, key: str, folder: Path) -> None:
        """Remove files without a manifest (an interrupted or foreign write), if they are still so.

        Checked again, since a writer may have renamed a complete entry into place since the
        manifest was found missing.
        """
        try:
            if folder.exists() and not (folder / MANIFEST).exists():
                self._discard(folder)
        except OSError as exc:
            raise unreadable(self.url, key, MANIFEST, exc) from exc

    # ---- stats and gc
    def _scan(self) -> tuple[list[Entry], list[Leftover]]:
        try:
            return self._scan_tree()
        except StoreError:
            raise
        except OSError as exc:
            raise StoreError(f"artifact store {self.url} cannot be listed ({type(exc).__name__}: {exc}); "
                             "nothing was removed") from exc

    def _scan_tree(self) -> tuple[list[Entry], list[Leftover]]:
        entries: list[Entry] = []
        leftovers: list[Leftover] = []
        for d in sorted((self.root / STAGING).iterdir()):
            try:
                size, mtime = _tree(d)
            except FileNotFoundError:
                continue  # a writer just committed or cleaned up
            leftovers.append(Leftover(str(d), "staging", size, mtime))
        for prefix in sorted(self.root.iterdir()):
            if len(prefix.name) != 2 or not prefix.is_dir():
                continue
            for folder in sorted(prefix.iterdir()):
                if not KEY_RE.fullmatch(folder.name):
                    continue
                manifest_path = folder / MANIFEST
                try:
                    manifest = parse_manifest(manifest_path.read_bytes(), folder.name)
                    last_used = manifest_path.stat().st_mtime
                except (ValueError, *MISSING):  # no manifest, or an ill-formed one
                    try:
                        size, mtime = _tree(folder)
                    except FileNotFoundError:
                        continue  # removed while we looked
                    leftovers.append(Leftover(str(folder), "damaged", size, mtime, folder.name))
                    continue
                except OSError as exc:  # not proof of damage: stop before gc removes anything
                    raise unreadable(self.url, folder.name, MANIFEST, exc) from exc
                stage, size = stage_and_bytes(manifest)
                entries.append(Entry(folder.name, stage, size, last_used))
        return entries, leftovers

    def _remove_entry(self, key: str) -> None:
        self._discard(self.path(key))

    def _remove_leftover(self, item: Leftover) -> None:
        path = Path(item.path)
        if item.kind == "damaged":
            try:  # a writer may have renamed a complete entry into place since the scan
                parse_manifest((path / MANIFEST).read_bytes(), path.name)
                return
            except (ValueError, *MISSING):
                self._discard(path)
            except OSError as exc:
                raise unreadable(self.url, path.name, MANIFEST, exc) from exc
        else:
            shutil.rmtree(path, ignore_errors=True)
