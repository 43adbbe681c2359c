"""Prices and money: the price catalog in ``cluster/prices.csv`` turns measured
resource-seconds into yuan.

Each catalog row is one resource at one pricing tier with its ``source``, ``checked_at``
and ``confidence``; USD rows are converted with one FX rate, a config value. Prices and the
FX rate are finite (a NaN or an infinity would make every yuan after it meaningless, and
``cost.json`` not JSON): a catalog row or a rate that is not is refused with one line naming
the file and row, or the rate.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

from pydantic import Field, ValidationError

from stages.records import ProfileError
from stages.records import Record
from pipeline.models import LedgerRecord


class PriceRow(Record):
    resource: str
    provider: str
    tier: str
    price: float = Field(ge=0, allow_inf_nan=False)
    currency: str
    unit: str
    source: str
    checked_at: str
    confidence: str


class PriceCatalog(Record):
    rows: list[PriceRow]
    usd_cny: float = Field(gt=0, allow_inf_nan=False)
    tier: str = "on-demand"
    provider: str | None = Field(None, description="Only this provider's rows; None = the cheapest row.")

    @classmethod
    def load(cls, path: str | Path, *, usd_cny: float, tier: str = "on-demand",
             provider: str | None = None) -> "PriceCatalog":
        path = Path(path)
        if not isinstance(usd_cny, (int, float)) or not math.isfinite(usd_cny) or usd_cny <= 0:
            raise ProfileError(f"usd_cny = {usd_cny!r}: the FX rate (yuan per US dollar) must be a finite number "
                               "above 0")
        try:
            with path.open(newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh)
                rows = [_row(path, reader.line_num, row) for row in reader]
        except OSError as exc:
            raise ProfileError(f"{path}: cannot read the price catalog: {exc.strerror or exc}") from None
        except (UnicodeDecodeError, csv.Error) as exc:
            raise ProfileError(f"{path}: not a CSV price catalog: {exc}") from None
        if not rows:
            raise ProfileError(f"{path}: the price catalog has no rows (expected a header and one row per "
                               "resource, provider and tier, like cluster/prices.csv)")
        return cls(rows=rows, usd_cny=usd_cny, tier=tier, provider=provider)

    def with_tier(self, tier: str) -> "PriceCatalog":
        return self.model_copy(update={"tier": tier})

    def _yuan(self, row: PriceRow) -> float:
        return row.price * (self.usd_cny if row.currency == "USD" else 1.0)

    def row(self, resource: str) -> PriceRow:
        """The row that prices ``resource``: this tier, this provider if set, else the cheapest."""
        rows = [r for r in self.rows if r.resource == resource and r.tier == self.tier
                and self.provider in (None, r.provider)]
        if not rows:
            known = sorted({f"{r.resource} ({r.provider}, {r.tier})" for r in self.rows})
            who = f" from {self.provider}" if self.provider else ""
            raise ProfileError(f"no {self.tier} price{who} for resource {resource!r}; catalog has: {', '.join(known)}")
        return min(rows, key=self._yuan)

    def gpu_types(self) -> list[str]:
        return sorted({r.resource.removeprefix("gpu:") for r in self.rows if r.resource.startswith("gpu:")})

    def yuan_per_hour(self, resource: str) -> float:
        return self._yuan(self.row(resource))

    def cost(self, seconds: float, resource: str, units: float) -> float:
        """Yuan for holding ``units`` of ``resource`` for ``seconds``."""
        return seconds * units * self.yuan_per_hour(resource) / 3600.0

    def record(self, stage: str, shot: str | None, seconds: float, resource: str, units: float,
               cached: bool = False) -> LedgerRecord:
        yuan = 0.0 if cached else self.cost(seconds, resource, units)
        return LedgerRecord(stage=stage, shot=shot, seconds=0.0 if cached else seconds,
                            resource=resource, units=units, yuan=yuan, cached=cached)


def _row(path: Path, line: int, row: dict) -> PriceRow:
    """One catalog row, or a ProfileError naming the file, the line, the column and the problem."""
    if None in row:
        raise ProfileError(f"{path}:{line}: more fields than the header names ({row[None]!r} left over)")
    try:
        return PriceRow(**row)
    except ValidationError as exc:
        err = exc.errors()[0]
        column = ".".join(str(p) for p in err["loc"]) or "?"
        raise ProfileError(f"{path}:{line}: {column}: {err['msg']} (got {err.get('input')!r})") from None


def billed_yuan(catalog: PriceCatalog, wall_seconds: float, cluster: dict[str, float], gpu_type: str | None) -> float:
    """What the machines cost for the render's wall time: every held CPU core and GPU, busy or not."""
    yuan = catalog.cost(wall_seconds, "cpu", cluster.get("CPU", 0.0))
    if cluster.get("GPU", 0.0) and gpu_type:
        yuan += catalog.cost(wall_seconds, f"gpu:{gpu_type}", cluster["GPU"])
    return yuan
