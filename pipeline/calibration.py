"""Throughput calibration: how many seconds a stage needs per unit of work.

``cluster/calibration.csv`` has one row per (stage, backend, device): a fixed per-node
overhead plus seconds per unit per megapixel. Each row says where it came from: measured
here (``experiments/calibrate_cpu.py``, with the machine and date) or published (a source).
Estimates in the plan are computed from these rows only, so every estimated yuan traces to
one calibration row and one price row.
"""
from __future__ import annotations

import csv
from pathlib import Path

from pydantic import Field

from stages.records import ProfileError
from stages.records import Record

FIELDS = ["stage", "backend", "device", "unit", "overhead_s", "seconds_per_unit_mpx", "source", "measured_at"]


class CalibrationRow(Record):
    stage: str
    backend: str = Field(description="Backend/method and its setting, e.g. 'previz', 'flow:fast', 'x264:veryfast'.")
    device: str = Field(description="Price-catalog resource the stage holds, e.g. 'cpu'.")
    unit: str = Field(description="What is counted: panel, keyframe, inbetween, frame.")
    overhead_s: float = Field(ge=0, description="Fixed seconds per node (start-up, I/O).")
    seconds_per_unit_mpx: float = Field(ge=0, description="Seconds per unit per megapixel.")
    source: str
    measured_at: str

    def seconds(self, units: int, megapixels: float) -> float:
        return self.overhead_s + units * megapixels * self.seconds_per_unit_mpx


class Calibration(Record):
    rows: list[CalibrationRow]
    path: str

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        path = Path(path)
        if not path.exists():
            return cls(rows=[], path=str(path))
        try:
            with path.open(newline="", encoding="utf-8") as fh:
                rows = [CalibrationRow(**row) for row in csv.DictReader(fh)]
        except (OSError, ValueError) as exc:
            raise ProfileError(f"{path}: cannot read the calibration table: {exc}") from None
        return cls(rows=rows, path=str(path))

    def row(self, stage: str, backend: str, device: str = "cpu") -> CalibrationRow:
        for row in self.rows:
            if (row.stage, row.backend, row.device) == (stage, backend, device):
                return row
        raise ProfileError(
            f"{self.path}: no calibration row for stage={stage} backend={backend} device={device}; "
            "measure it with `python experiments/calibrate_cpu.py --profile PROFILE` (a name or .toml), or after "
            "GPU renders with `anim calibrate`")

    def write(self, rows: list[CalibrationRow]) -> None:
        """Replace rows with the same (stage, backend, device) and write the table back."""
        index = {(r.stage, r.backend, r.device): r for r in self.rows}
        index.update({(r.stage, r.backend, r.device): r for r in rows})
        path = Path(self.path)
        tmp = path.with_suffix(".tmp")
        with tmp.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=FIELDS)
            writer.writeheader()
            for key in sorted(index):
                writer.writerow(index[key].model_dump())
        tmp.replace(path)
