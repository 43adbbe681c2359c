"""Throughput calibration: how many seconds a stage needs per unit of work.

A calibration table has one row per (stage, backend, device): a fixed per-node overhead plus
seconds per unit per megapixel. Each row says where it came from: measured here
(``experiments/calibrate_cpu.py``, ``anim calibrate``, with the machine and date) or published
(a source). Estimates in the plan are computed from these rows only, so every estimated yuan
traces to one calibration row and one price row.

Tables are layered: the one shipped in ``cluster/calibration.csv`` is the starting point, and
the rows measured on this machine or cluster (the ``user_calibration`` setting, written by
``anim calibrate``) take precedence over shipped rows with the same (stage, backend, device).
"""
from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path

from pydantic import Field, ValidationError

from stages.records import ProfileError
from stages.records import Record

FIELDS = ["stage", "backend", "device", "unit", "overhead_s", "seconds_per_unit_mpx", "source", "measured_at"]


class CalibrationRow(Record):
    stage: str
    backend: str = Field(description="Backend/method and its setting, e.g. 'previz', 'flow:fast', 'x264:veryfast'.")
    device: str = Field(description="Price-catalog resource the stage holds, e.g. 'cpu'.")
    unit: str = Field(description="What is counted: panel, keyframe, inbetween, frame.")
    overhead_s: float = Field(ge=0, allow_inf_nan=False, description="Fixed seconds per node (start-up, I/O).")
    seconds_per_unit_mpx: float = Field(ge=0, allow_inf_nan=False, description="Seconds per unit per megapixel.")
    source: str
    measured_at: str

    def seconds(self, units: int, megapixels: float) -> float:
        return self.overhead_s + units * megapixels * self.seconds_per_unit_mpx


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

    def row(self, stage: str, backend: str, device: str = "cpu") -> CalibrationRow:
        for row in self.rows:
            if _key(row) == (stage, backend, device):
                return row
        searched = ", ".join(p if Path(p).exists() else f"{p} (absent)" for p in self.paths) or "an in-memory table"
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
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", newline="", encoding="utf-8") as fh:
                writer = csv.DictWriter(fh, fieldnames=FIELDS)
                writer.writeheader()
                for key in sorted(index):
                    writer.writerow(index[key].model_dump())
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path
