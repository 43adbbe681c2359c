"""Publish a render's outputs: the whole output folder is replaced in one step, or not at all.

``publish`` builds the new folder beside the old one and swaps it in, so ``out_dir`` holds
either every file of the new render or the previous render's folder exactly as it was —
never a new ``plan.json`` beside an old ``episode.mp4``, never a file of an older render that
the new one did not produce. On any error (a missing artifact, a full disk) the old folder
is untouched and the half-built new one is removed.

On disk, for ``out/ep-draft-16x9``, everything lives beside it in ``out/``:

* ``ep-draft-16x9/``                 the published folder; its ``.anim-publish.json`` lists the files
* ``.ep-draft-16x9.publish-<hex>/``  a new folder being written (one per attempt)
* ``.ep-draft-16x9.old/``            the previous folder during the swap
* ``.ep-draft-16x9.lock``            held (``flock``) for a whole publish: one at a time per folder

The swap is two renames (old folder → ``.old``, new folder → ``out_dir``), then the old copy
is deleted. A process that dies between the two renames leaves no ``out_dir`` but a complete
``.old`` (the previous render, untouched) and a complete ``.publish-<hex>`` (the new one):
recover by hand with ``mv out/.ep-draft-16x9.old out/ep-draft-16x9`` (the previous render) or
by renaming the ``.publish-`` folder instead (the new one); the next ``publish`` to that folder
does the former itself, then removes every leftover, under the lock, before it writes.

The guarantee covers a failed or killed process, not a power cut: like the artifact store,
nothing is fsynced. A folder that is not empty and has no ``.anim-publish.json`` (``--out .``,
a home directory, a folder of an older version of this tool) is never replaced.

``check_out_dir`` runs the same checks before a render does any work (``anim render`` calls it
before Ray starts): a target that is a file or a foreign folder, a location under a file, on a
read-only or full filesystem, or an explicit ``--out`` whose parent folder does not exist, is
refused with one line and nothing is created. Every side file is strict JSON (no ``NaN`` or
``Infinity``): a value that JSON cannot hold is refused before anything is written.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import re
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from stages.records import AnimError

MARKER = ".anim-publish.json"
_UNSAFE = re.compile(r"[^\w.+-]+")  # \w is Unicode: a Chinese script name stays readable


class PublishError(AnimError):
    """Outputs that could not be published; the message says what ``out_dir`` holds now."""


def default_out_dir(script: Path, profile: str, aspect: str, root: Path = Path("out")) -> Path:
    """The output folder of one script at one profile and aspect, e.g. ``out/episode_en-draft-16x9``.

    ``profile`` is a built-in name or a ``.toml`` path (its stem is used); ``16:9`` becomes
    ``16x9``; any other character that is not a letter, digit, ``.``, ``+``, ``-`` or ``_``
    becomes ``_``, so the name is one safe path component on every filesystem.
    """
    parts = {"script": Path(script).stem, "profile": Path(profile).stem if profile.endswith(".toml") else profile,
             "aspect": aspect.replace(":", "x")}
    safe = {}
    for what, text in parts.items():
        safe[what] = _UNSAFE.sub("_", text).strip(".")
        if not safe[what]:
            raise ValueError(f"default_out_dir: {what} {text!r} leaves nothing to name a folder with")
    return Path(root) / f"{safe['script']}-{safe['profile']}-{safe['aspect']}"


def check_out_dir(out_dir: Path, *, create_parents: bool = True) -> None:
    """Refuse, before any work, an ``out_dir`` that ``publish`` could not fill; creates nothing.

    Refused (``PublishError`` naming the path): ``out_dir`` is a file or a link, or a folder
    holding files no render published; a path under a file (``a-file/ep``); a place where no
    file can be created (a read-only filesystem, ``/proc``); a full filesystem; and, with
    ``create_parents=False`` (an ``--out`` the user typed), a parent folder that does not exist.
    The check writes and removes one empty probe file in the nearest existing folder.
    """
    out_dir = Path(out_dir)
    if out_dir.name in ("", ".", ".."):
        raise PublishError(f"{out_dir}: does not name a folder to publish into; nothing was written")
    try:
        _check_replaceable(out_dir)
        above = out_dir.parent  # where the new folder is built, beside the old one
        while not above.exists() and above != above.parent:
            above = above.parent
    except OSError as exc:  # a folder on the way that cannot even be looked into
        raise PublishError(f"{out_dir}: cannot look at it ({exc.strerror or exc}); choose another --out; "
                           "nothing was written") from None
    if not above.is_dir():
        raise PublishError(f"{out_dir}: {above} is a file, not a folder; nothing was written")
    if not create_parents and above != out_dir.parent:
        raise PublishError(f"{out_dir}: its folder {out_dir.parent} does not exist; create it first or choose "
                           "another --out; nothing was written")
    try:
        fd, probe = tempfile.mkstemp(prefix=".anim-publish-probe-", dir=above)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise PublishError(f"{out_dir}: cannot create files in {above} ({exc.strerror or exc}); choose another "
                           "--out; nothing was written") from None
    try:
        fs = os.statvfs(above)
    except OSError:
        return
    if fs.f_blocks and fs.f_bavail == 0 or fs.f_files and fs.f_favail == 0:
        raise PublishError(f"{out_dir}: the filesystem holding {above} is full; free some space or choose another "
                           "--out; nothing was written")


def publish(outputs: dict[str, Path], out_dir: Path, extra: dict[str, Any], *,
            create_parents: bool = True) -> dict[str, Path]:
    """Replace ``out_dir`` with a folder holding ``outputs`` (copied) and ``extra`` (as JSON).

    ``outputs`` maps a file name to a file in the artifact store; ``extra`` maps a file name to
    JSON-able data, written as strict JSON with ``indent=2, ensure_ascii=False`` (a NaN or an
    infinity is refused, naming the file and the field). ``create_parents=False``: the parent
    of ``out_dir`` must exist. Returns name -> final path. Raises ``PublishError`` when anything
    fails; ``out_dir`` is then the previous folder, untouched (or absent, if there was none),
    and no temporary folder is left behind.
    """
    # 1. Check the names: flat file names, each given once, none the marker.
    names = list(outputs) + list(extra)
    for name in names:
        if name in ("", ".", "..", MARKER) or Path(name).name != name or "\\" in name:
            raise ValueError(f"publish: {name!r} is not a plain file name (or is reserved)")
    if clash := set(outputs) & set(extra):
        raise ValueError(f"publish: {sorted(clash)} given both as an artifact and as a JSON side file")
    out_dir = Path(out_dir)
    parent, base = out_dir.parent, out_dir.name
    if base in ("", ".", ".."):
        raise ValueError(f"publish: out_dir {str(out_dir)!r} does not name a folder")
    old = parent / f".{base}.old"
    texts = {name: _strict_json(out_dir, name, data) for name, data in extra.items()}
    check_out_dir(out_dir, create_parents=create_parents)
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PublishError(f"publishing into {out_dir}: cannot create {parent} ({exc.strerror or exc}); "
                           "nothing was written") from None

    with _locked(parent / f".{base}.lock", out_dir):
        # 2. Under the lock, every sibling of ours is a leftover of a process that died.
        if not out_dir.exists() and old.is_dir():
            os.replace(old, out_dir)  # it died between the two renames: the previous folder comes back
        _check_replaceable(out_dir)
        attempt = re.compile(rf"\.{re.escape(base)}\.publish-[0-9a-f]{{12}}")
        for leftover in [old, *(parent / n for n in os.listdir(parent) if attempt.fullmatch(n))]:
            shutil.rmtree(leftover, ignore_errors=True)

        # 3. Build the new folder beside the old one (same filesystem: each rename below is one step).
        new = parent / f".{base}.publish-{secrets.token_hex(6)}"
        _step(out_dir, "creating the new folder", new.mkdir)
        try:
            for name, src in outputs.items():
                _step(out_dir, f"copying {name} from {src}", shutil.copyfile, src, new / name)
            for name, text in texts.items():
                _step(out_dir, f"writing {name}", (new / name).write_text, text, encoding="utf-8")
            marker = json.dumps({"files": sorted(names)}, indent=2, ensure_ascii=False, allow_nan=False)
            _step(out_dir, f"writing {MARKER}", (new / MARKER).write_text, marker, encoding="utf-8")

            # 4. Swap: the old folder aside, the new one in (put the old one back if that fails).
            had_old = out_dir.exists()
            if had_old:
                _step(out_dir, "moving the previous folder aside", os.replace, out_dir, old)
            try:
                os.replace(new, out_dir)
            except OSError as exc:
                if had_old:
                    _put_back(old, out_dir, exc)
                raise PublishError(f"publishing into {out_dir}: moving the new folder into place failed: {exc}; "
                                   "the previous output folder is back in place, the new one removed") from None
        except BaseException:
            shutil.rmtree(new, ignore_errors=True)
            raise
        # 5. The previous render's copy is no longer needed (what a failure leaves, the next publish removes).
        shutil.rmtree(old, ignore_errors=True)
    return {name: out_dir / name for name in names}


def _strict_json(out_dir: Path, name: str, data: Any) -> str:
    """``data`` as strict JSON; a NaN or an infinity anywhere is a PublishError naming where."""
    try:
        return json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False)
    except ValueError:
        if (found := _first_non_finite(data)) is None:
            raise
        where, value = found
        raise PublishError(f"publishing into {out_dir}: {name}: {where} is {value}, which JSON cannot hold "
                           "(a setting or a measurement that is not a finite number); nothing was written") from None


def _first_non_finite(data: Any, where: str = "") -> tuple[str, float] | None:
    if isinstance(data, float) and not math.isfinite(data):
        return where or "the value", data
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, (list, tuple)) else ()
    for key, value in items:
        if found := _first_non_finite(value, f"{where}[{key}]" if isinstance(key, int) else
                                      f"{where}.{key}" if where else str(key)):
            return found
    return None


def _step(out_dir: Path, what: str, fn, *args, **kwargs) -> None:
    """One filesystem step before the swap; its OSError becomes a PublishError saying nothing changed."""
    try:
        fn(*args, **kwargs)
    except OSError as exc:
        raise PublishError(f"publishing into {out_dir}: {what} failed: {exc}; the previous output folder is "
                           "untouched and the partial new one removed") from None


def _put_back(old: Path, out_dir: Path, cause: OSError) -> None:
    try:
        os.replace(old, out_dir)
    except OSError as exc:
        raise PublishError(f"publishing into {out_dir}: moving the new folder into place failed ({cause}), and "
                           f"so did putting the previous one back ({exc}): it is intact at {old}, and the next "
                           "publish to this folder restores it first") from None


def _check_replaceable(out_dir: Path) -> None:
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        kind = "a link" if out_dir.is_symlink() else "a file" if out_dir.is_file() else "a device or a special file"
        raise PublishError(f"{out_dir} is not a folder ({kind}): outputs replace folders only; nothing was written")
    if out_dir.is_dir() and not (out_dir / MARKER).is_file() and any(out_dir.iterdir()):
        raise PublishError(f"{out_dir} holds files that no render published (no {MARKER}); publishing replaces "
                           "the whole folder, so it is left alone: move it away or choose another --out; "
                           "nothing was written")


@contextmanager
def _locked(path: Path, out_dir: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the block."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise PublishError(f"publishing into {out_dir}: cannot create the lock file {path} "
                           f"({exc.strerror or exc}); nothing was written") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
