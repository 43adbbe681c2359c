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
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import shutil
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


def publish(outputs: dict[str, Path], out_dir: Path, extra: dict[str, Any]) -> dict[str, Path]:
    """Replace ``out_dir`` with a folder holding ``outputs`` (copied) and ``extra`` (as JSON).

    ``outputs`` maps a file name to a file in the artifact store; ``extra`` maps a file name to
    JSON-able data, written with ``indent=2, ensure_ascii=False``. Returns name -> final path.
    Raises ``PublishError`` when anything fails; ``out_dir`` is then the previous folder,
    untouched (or absent, if there was none), and no temporary folder is left behind.
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
    parent.mkdir(parents=True, exist_ok=True)

    with _locked(parent / f".{base}.lock"):
        # 2. Under the lock, every sibling of ours is a leftover of a process that died.
        if not out_dir.exists() and old.is_dir():
            os.replace(old, out_dir)  # it died between the two renames: the previous folder comes back
        _check_replaceable(out_dir)
        attempt = re.compile(rf"\.{re.escape(base)}\.publish-[0-9a-f]{{12}}")
        for leftover in [old, *(parent / n for n in os.listdir(parent) if attempt.fullmatch(n))]:
            shutil.rmtree(leftover, ignore_errors=True)

        # 3. Build the new folder beside the old one (same filesystem: each rename below is one step).
        new = parent / f".{base}.publish-{secrets.token_hex(6)}"
        new.mkdir()
        try:
            for name, src in outputs.items():
                _step(out_dir, f"copying {name} from {src}", shutil.copyfile, src, new / name)
            for name, data in extra.items():
                text = json.dumps(data, indent=2, ensure_ascii=False)
                _step(out_dir, f"writing {name}", (new / name).write_text, text, encoding="utf-8")
            marker = json.dumps({"files": sorted(names)}, indent=2, ensure_ascii=False)
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
        raise PublishError(f"{out_dir} is not a folder (a file or a link): outputs replace folders only; "
                           "nothing was written")
    if out_dir.is_dir() and not (out_dir / MARKER).is_file() and any(out_dir.iterdir()):
        raise PublishError(f"{out_dir} holds files that no render published (no {MARKER}); publishing replaces "
                           "the whole folder, so it is left alone: move it away or choose another --out; "
                           "nothing was written")


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the block."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
