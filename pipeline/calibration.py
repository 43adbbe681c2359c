"""Throughput calibration: how many seconds a stage needs per unit of work.

A calibration table has one row per (stage, backend, device): a fixed per-node overhead plus
seconds per unit per megapixel (and, in a row this cluster learned, a fixed cost per unit: a
frame's or a drawing's share that does not grow with its pixels). Each row says where it came from: measured here
(``experiments/calibrate_cpu.py``, ``anim calibrate``, with the machine and date) or published
(a source). Estimates in the plan are computed from these rows only, so every estimated yuan
traces to one calibration row and one price row.

Rows are layered, lowest precedence first:

1. the table shipped in ``cluster/calibration.csv``: only the starting point;
2. the ``user_calibration`` table (written by ``anim calibrate``, never the checkout's);
3. **this cluster's rows**, learned from its own renders (``ClusterHistory``, fitted by
   ``pipeline.calibrate``): where they exist they price the plan, since a studio's cluster is
   never the machine that wrote the shipped table.

This cluster's measurements live in the artifact store, where the whole team shares them, as
one immutable small JSON file per render and calibration key, outside the content-addressed
area (``anim cache gc`` and ``stats`` never see them)::

    STORE/calibration/<fingerprint id>/<stage>-<backend>-<device>-<hash>/<YYYY-MM>/<epoch ms>-<random>.json

No file is ever appended to or rewritten, so two renders never collide, and the same code
serves a local folder and any fsspec URL.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import tempfile
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError

from pipeline.fingerprint import Fingerprint
from stages.records import AnimError, ProfileError, Record

FIELDS = ["stage", "backend", "device", "unit", "overhead_s", "seconds_per_unit_mpx", "source", "measured_at"]


def write_atomic(path: Path, data: bytes) -> None:
    """``data`` as ``path``, complete or not at all: written beside it, synced, renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class CalibrationRow(Record):
    stage: str
    backend: str = Field(description="Backend/method and its setting, e.g. 'previz', 'flow:fast', 'x264:veryfast'.")
    device: str = Field(description="Price-catalog resource the stage holds, e.g. 'cpu'.")
    unit: str = Field(description="What is counted: panel, keyframe, inbetween, frame.")
    overhead_s: float = Field(ge=0, allow_inf_nan=False, description="Fixed seconds per node (start-up, I/O).")
    seconds_per_unit_mpx: float = Field(ge=0, allow_inf_nan=False, description="Seconds per unit per megapixel.")
    seconds_per_unit: float = Field(0.0, ge=0, allow_inf_nan=False, description="Seconds per unit whatever its "
                                    "megapixels (learned rows; 0 in a table, whose rows scale with pixels only).")
    source: str
    measured_at: str
    band: float | None = Field(None, ge=0, allow_inf_nan=False, description="± fraction of this row's estimates "
                               "on this cluster (0.08 = ±8%): what it missed by on renders left out of its fit "
                               "(pipeline.calibrate.COVERAGE of them inside), or with one render its fit residual; "
                               "None for a row from a table.")
    misses: dict[str, float] = Field(default_factory=dict, description="Per render it was learned from (by its "
                                     "time), that render's measured seconds over what the row fitted without it "
                                     "(without its script, where others exist): what the plan's band is made of.")
    renders: int = Field(0, ge=0, description="Renders of this cluster the row was learned from; 0 for a table row.")

    def seconds(self, units: int, megapixels: float) -> float:
        return self.overhead_s + self.marginal(units, megapixels)

    def marginal(self, units: int, megapixels: float) -> float:
        """Seconds of ``units`` of work inside a node, without the node's overhead."""
        return units * (self.seconds_per_unit + megapixels * self.seconds_per_unit_mpx)


Key = tuple[str, str, str]


def _key(row: CalibrationRow) -> Key:
    return row.stage, row.backend, row.device


def _read(path: Path) -> list[CalibrationRow]:
    """The rows of one table; a table that does not exist has none."""
    if not path.exists():
        return []
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            return [_row(path, reader.line_num, row) for row in reader]
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read the calibration table: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ProfileError(f"{path}: not a CSV calibration table: {exc}") from None


def _row(path: Path, line: int, row: dict) -> CalibrationRow:
    """One table row, or a ProfileError naming the file, the line, the column and the problem
    (seconds are finite and not negative)."""
    if None in row:
        raise ProfileError(f"{path}:{line}: more fields than the header names ({row[None]!r} left over)")
    try:
        return CalibrationRow(**row)
    except ValidationError as exc:
        err = exc.errors()[0]
        column = ".".join(str(p) for p in err["loc"]) or "?"
        raise ProfileError(f"{path}:{line}: {column}: {err['msg']} (got {err.get('input')!r})") from None


class Calibration(Record):
    """The rows of one or more layered tables; a later table's row wins over an earlier one's."""

    rows: list[CalibrationRow]
    paths: list[str] = Field(default_factory=list, description="The tables searched, lowest precedence "
                             "first; none for a table built in memory.")
    cluster: str | None = Field(None, description="The cluster whose learned rows were looked for (its label); "
                                "None when none were.")
    cluster_location: str | None = Field(None, description="Where that cluster's measurements are kept.")
    ignored: list[str] = Field(default_factory=list, description="This cluster's measurement files that could "
                               "not be read (one line each); their renders were left out.")

    @property
    def path(self) -> str:
        """The top layer: the table ``write`` updates."""
        if not self.paths:
            raise ValueError("a calibration table built in memory has no file")
        return self.paths[-1]

    @classmethod
    def load(cls, *paths: str | Path) -> "Calibration":
        """Layer the tables in ``paths`` (lowest precedence first); a missing table adds no rows."""
        if not paths:
            raise ValueError("Calibration.load needs at least one table")
        index: dict[Key, CalibrationRow] = {}
        for path in paths:
            index.update({_key(r): r for r in _read(Path(path))})
        return cls(rows=list(index.values()), paths=[str(p) for p in paths])

    def overlay(self, rows: list[CalibrationRow], *, cluster: str, location: str,
                ignored: list[str] | None = None) -> "Calibration":
        """These rows, learned on ``cluster`` and kept at ``location``, over the tables' rows with the
        same key (highest precedence)."""
        index = {_key(r): r for r in self.rows}
        index.update({_key(r): r for r in rows})
        return self.model_copy(update={"rows": list(index.values()), "cluster": cluster, "cluster_location": location,
                                       "ignored": [*self.ignored, *(ignored or [])]})

    def row(self, stage: str, backend: str, device: str = "cpu") -> CalibrationRow:
        for row in self.rows:
            if _key(row) == (stage, backend, device):
                return row
        searched = ", ".join(p if Path(p).exists() else f"{p} (absent)" for p in self.paths) or "an in-memory table"
        if self.cluster:
            searched += f" and this cluster's rows ({self.cluster}) in {self.cluster_location}"
        raise ProfileError(
            f"no calibration row for stage={stage} backend={backend} device={device} in {searched}; "
            "measure it with `python experiments/calibrate_cpu.py --profile PROFILE` (a name or .toml), or after "
            "GPU renders with `anim calibrate`")

    def write(self, rows: list[CalibrationRow]) -> Path:
        """Put ``rows`` into the top table (``path``), replacing its rows with the same key and
        keeping its others; lower layers are neither copied nor touched. Atomic: the table is
        written beside itself and renamed over the old one. Returns the path written."""
        path = Path(self.path)
        index = {_key(r): r for r in _read(path)}
        index.update({_key(r): r for r in rows})
        out = io.StringIO(newline="")
        writer = csv.DictWriter(out, fieldnames=FIELDS)
        writer.writeheader()
        for key in sorted(index):
            writer.writerow(index[key].model_dump(include=set(FIELDS)))
        write_atomic(path, out.getvalue().encode("utf-8"))
        return path


# --------------------------------------------------------------------------- this cluster's measurements


class CalibrationError(AnimError):
    """This cluster's measurements cannot be read or written where the store keeps them."""


SCHEMA = "anim.calibration-measurements/1"
FOLDER = "calibration"
Amount = Annotated[float, Field(ge=0, allow_inf_nan=False)]
_NAME = re.compile(r"[0-9]{13}-[0-9a-f]{12}\.json")


class Measurements(Record):
    """One render's executed nodes of one calibration key on one cluster: one immutable file.

    ``kind="refit"`` is a deliberate refit (``anim calibrate``) pooling the nodes of several
    recorded renders; learning starts again from the newest refit of a key.
    """

    format: Literal["anim.calibration-measurements/1"] = SCHEMA
    kind: Literal["render", "refit"] = "render"
    stage: str
    backend: str
    device: str
    unit: str
    work: list[Amount] = Field(min_length=1, description="Per executed node: units × megapixels it did.")
    units: list[Amount] | None = Field(None, description="Per executed node: the units of that work (None in "
                                       "files written before they were recorded: fitted on work alone).")
    seconds: list[Amount] = Field(min_length=1, description="Per executed node: wall seconds measured.")
    at: float = Field(ge=0, allow_inf_nan=False, description="Epoch when the render finished (or the refit "
                      "was made).")
    fingerprint: Fingerprint
    resources: dict[str, float] = Field(default_factory=dict, description="What the render held, as Ray counted "
                                        "it ({'CPU': 2.0, 'GPU': 0.0}); for information.")
    runs: list[str] = Field(default_factory=list, description="MLflow run ids behind these nodes.")
    renders: int = Field(1, ge=1, description="Renders pooled (a refit pools several).")
    script_sha256: str | None = None
    profile: str | None = None

    @property
    def key(self) -> tuple[str, str, str, str]:
        return self.stage, self.backend, self.device, self.unit


def _folder_name(key: tuple[str, str, str, str]) -> str:
    """A file name per calibration key: readable, and exact by its hash (backends contain ':')."""
    readable = re.sub(r"[^A-Za-z0-9.+_-]", "_", "-".join(key[:3]))[:80]
    return f"{readable}-{hashlib.sha256('|'.join(key).encode('utf-8')).hexdigest()[:8]}"


class ClusterHistory:
    """This cluster's measurement files in the artifact store at ``store`` (a path or fsspec URL).

    Opening one reads and creates nothing: a cluster that never rendered has an empty history.
    """

    def __init__(self, store: str | Path, fingerprint: Fingerprint):
        from pipeline.store.base import local_path, open_fs
        from pipeline.store.manifest import StoreError

        self.fingerprint = fingerprint
        local = local_path(store)
        try:
            if local is not None:
                from fsspec.implementations.local import LocalFileSystem

                self.fs, root, self.local = LocalFileSystem(), str(local.expanduser().resolve()), True
            else:
                self.fs, root = open_fs(str(store))
                self.local = False
        except StoreError as exc:
            raise CalibrationError(str(exc)) from None
        self.root = f"{root.rstrip('/')}/{FOLDER}/{fingerprint.id}"
        self.location = self.root if self.local else self.fs.unstrip_protocol(self.root)

    def add(self, items: list[Measurements]) -> list[str]:
        """Write each as a new file (never over another); returns their locations."""
        written = []
        for m in items:
            name = f"{int(m.at * 1000):013d}-{uuid.uuid4().hex[:12]}.json"
            month = datetime.fromtimestamp(m.at, timezone.utc).strftime("%Y-%m")
            path = f"{self.root}/{_folder_name(m.key)}/{month}/{name}"
            data = m.model_dump_json().encode("utf-8")
            try:
                self._write(path, data)
            except Exception as exc:  # any filesystem's own error kind
                raise CalibrationError(f"cannot write this cluster's measurements to {path}: "
                                       f"{type(exc).__name__}: {exc}") from None
            written.append(path)
        return written

    def _write(self, path: str, data: bytes) -> None:
        if not self.local:
            self.fs.pipe_file(path, data)  # one object, put whole: readers never see half of it
            return
        write_atomic(Path(path), data)

    def recent(self, window: int) -> tuple[dict[tuple[str, str, str, str], list[Measurements]], list[str]]:
        """Per calibration key, its newest ``window`` files, newest first, back to (and with) its
        newest refit; and one line per file that could not be read (left out, never removed).

        Only the newest months of a key are listed, so the cost of a look does not grow with the
        cluster's history."""
        out: dict[tuple[str, str, str, str], list[Measurements]] = {}
        ignored: list[str] = []
        for key_dir in self._ls(self.root, "directory"):
            chosen: list[Measurements] = []
            full = lambda: len(chosen) >= window or (chosen and chosen[-1].kind == "refit")  # noqa: E731
            for month in sorted(self._ls(key_dir, "directory"), reverse=True):
                # Newest first (names start with the epoch), a window's worth of reads at a time.
                pending = sorted((p for p in self._ls(month, "file") if _NAME.fullmatch(p.rpartition("/")[2])),
                                 reverse=True)  # temporary files of a write in progress do not match
                while pending and not full():
                    batch, pending = pending[:window], pending[window:]
                    for path, raw in self._cat(batch).items():
                        if full():
                            break
                        if (m := self._parse(path, raw, ignored)) is not None:
                            chosen.append(m)
                if full():
                    break
            if chosen:
                out[chosen[0].key] = chosen
        return out, ignored

    def _ls(self, folder: str, kind: str) -> list[str]:
        """Sorted paths of the folders (``kind="directory"``) or files in ``folder``; none if it is absent."""
        try:
            entries = self.fs.ls(folder, detail=True)
        except FileNotFoundError:
            return []
        except Exception as exc:
            raise CalibrationError(f"cannot list this cluster's measurements in {self.location}: "
                                   f"{type(exc).__name__}: {exc}") from None
        strip = self.fs._strip_protocol
        return sorted(strip(e["name"]).rstrip("/") for e in entries if e.get("type") == kind
                      and strip(e["name"]).rstrip("/") != folder.rstrip("/"))

    def _cat(self, paths: list[str]) -> dict[str, bytes | BaseException]:
        try:
            found = self.fs.cat(paths, on_error="return")
        except Exception as exc:
            raise CalibrationError(f"cannot read this cluster's measurements in {self.location}: "
                                   f"{type(exc).__name__}: {exc}") from None
        if not isinstance(found, dict):
            found = {paths[0]: found}
        strip = self.fs._strip_protocol
        by_path = {strip(p): v for p, v in found.items()}
        return {p: by_path.get(strip(p), FileNotFoundError(p)) for p in paths}  # in the order asked

    def _parse(self, path: str, raw: bytes | BaseException, ignored: list[str]) -> Measurements | None:
        if isinstance(raw, FileNotFoundError):
            return None  # removed by hand since the listing
        if isinstance(raw, BaseException):
            raise CalibrationError(f"cannot read this cluster's measurements file {path}: "
                                   f"{type(raw).__name__}: {raw}") from None
        try:
            m = Measurements.model_validate_json(raw)
        except ValueError as exc:
            first = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
            ignored.append(f"{path}: not a measurements file ({first}); left out")
            return None
        problem = ("work and seconds differ in length" if len(m.work) != len(m.seconds) else
                   "units and work differ in length" if m.units is not None and len(m.units) != len(m.work) else
                   f"measured on another cluster ({m.fingerprint.label})" if m.fingerprint.id != self.fingerprint.id
                   else None)
        if problem:
            ignored.append(f"{path}: {problem}; left out")
            return None
        return m
