"""Content-addressed artifact store on a local directory or any fsspec filesystem.

Every node's output lives under its content key, with a ``manifest.json`` naming each file
with its size and sha256. A manifest whose checksums hold is the only proof that an
artifact exists. Only content proven bad (an ill-formed manifest, a file it names that is
missing, a wrong size or checksum; on a local store also files without a manifest) is
treated as absent and removed, so it is recomputed, never used. A read that fails for any
other reason (EIO, a permission, a network timeout) raises :class:`StoreError` naming the
entry and the store, and removes nothing: on a shared store a hiccup must not destroy good
artifacts.

``open_store(location)`` opens one of two layouts, chosen by the location:

* **Local** (a path or ``file://`` URL, :class:`LocalStore`): ``ROOT/ab/abcdef…/{files,
  manifest.json}``. Files are staged in ``ROOT/.staging/<write>/``, the manifest is written
  last, and the directory is renamed into place in one step. A hit touches the manifest's
  mtime: that is its last use.
* **Remote** (``s3://``, ``oss://``, ``memory://`` …, :class:`RemoteStore`):
  ``PREFIX/ab/abcdef…/<write>/<files>``, then ``PREFIX/ab/abcdef…/manifest.json`` created
  last (a conditional put where the filesystem has one), then ``used`` (the epoch of the
  last use, rewritten at most once an hour per key and machine). Each write uploads under
  its own ``<write>`` prefix (``<epoch>-<random>``), so two writers of one key never
  overwrite each other's files; the manifest names the one upload that counts. ``get``
  downloads into a local read-through cache and checks every copy against the manifest.

Beside the artifacts, **notes** (``create_note`` … ``remove_note``): small records keyed by a
content key that are not artifacts — a key's lease while a render computes it (``lease``: two
renders that need one key at once compute it once) and the spend records of the nodes that
made it (``pipeline.ledger``). ``stats`` and ``gc`` do not count or remove them.

``stats()`` and ``gc()`` read the manifests only (no database): stage, size, creation and
last use are all recorded there or beside it.

Modules: ``manifest`` (format, checks, records, the error), ``base`` (:class:`Store`, what
both layouts share), ``local`` and ``remote`` (one layout each), ``lease`` (leases, on notes).
fsspec is imported only when a URL is opened.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.store.base import Store, local_path
from pipeline.store.lease import Lease, LeaseInfo
from pipeline.store.local import LocalStore, check_location
from pipeline.store.manifest import GcItem, GcReport, StageUsage, StoreError, StoreStats
from pipeline.store.remote import RemoteStore

__all__ = ["open_store", "check_store_location", "Store", "LocalStore", "RemoteStore", "StoreError", "StoreStats",
           "StageUsage", "GcItem",
           "GcReport", "Lease", "LeaseInfo"]


def check_store_location(location: str | Path, *, create_parents: bool = True) -> None:
    """What :func:`open_store` checks before it creates anything, for a caller that reads the
    location before opening it: StoreError naming a local location that is not a folder, lies
    under a file, names an unknown ``~user`` or (``create_parents=False``) lies in a folder that
    does not exist. Creates nothing; a remote URL is not contacted."""
    if location is None or not str(location).strip():
        raise StoreError(f"an artifact store needs a location: a path or an fsspec URL, got {location!r}")
    if local_path(location) is not None:
        check_location(location, create_parents=create_parents)


def open_store(location: str | Path, *, local_cache: str | Path | None = None, create_parents: bool = True) -> Store:
    """The artifact store at ``location``: a :class:`LocalStore` for a path or ``file://`` URL,
    a :class:`RemoteStore` for any other fsspec URL.

    ``local_cache`` is where a remote store keeps its checked copies (default: the per-user
    cache directory); a local store uses its artifacts in place and ignores it.
    ``open_store(store.url)`` opens the same store in another process.

    A local store is created when it does not exist. ``create_parents=False`` is for a location
    the user gave (``ANIM_STORE``, a config file): the folder that holds it must exist, so a
    typo is an error, not a new tree of folders; the default per-user store is opened with
    ``True`` and created on first use. A location that is a file, a device, lies under a file or
    cannot be written raises :class:`StoreError` naming it.
    """
    if location is None or not str(location).strip():
        raise StoreError(f"an artifact store needs a location: a path or an fsspec URL, got {location!r}")
    if local_path(location) is not None:
        return LocalStore(location, local_cache=local_cache, create_parents=create_parents)
    return RemoteStore(location, local_cache=local_cache)
