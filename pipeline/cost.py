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
               cached: bool = False, method: str | None = None) -> LedgerRecord:
        yuan = 0.0 if cached else self.cost(seconds, resource, units)
        return LedgerRecord(stage=stage, shot=shot, seconds=0.0 if cached else seconds,
                            resource=resource, units=units, yuan=yuan, cached=cached, method=method)


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


# Ledger stages the billed view carries beside the nodes: a model actor's start, never one shot's work.
STARTUP_STAGES = ("model_load", "warmup")


class BilledItem(Record):
    """One resource's billed time: what it was held for and what that went to (resource-seconds)."""

    resource: str
    units: float = Field(description="How many the cluster held (cores, GPUs).")
    held_s: float = Field(description="units × wall seconds of the render.")
    model_load_s: float
    warmup_s: float
    busy_s: float = Field(description="The nodes' measured resource-seconds (the attributed view).")
    idle_s: float = Field(description="Held and doing none of the above: max(0, held − load − warm-up − busy).")
    cluster_start_s: float = Field(description="units × the seconds Ray took to start for this render.")

    @property
    def busy_fraction(self) -> float:
        return self.busy_s / self.held_s if self.held_s else 0.0


class BilledView(Record):
    """What a cloud bills for one render, itemised, with the attributed cost beside it.

    ``billed_yuan`` = model load + warm-up + busy + idle + cluster start, exactly; ``busy_yuan``
    is the attributed cost (the ledger's nodes); ``utilization`` = attributed / billed. Idle is
    the cluster's held CPUs and GPUs × the render's wall time less what the nodes and the model
    starts used; where the ledger bills more resource-seconds than the cluster held (fractional
    CPUs under Ray), idle is 0, not negative."""

    attributed_yuan: float
    model_load_yuan: float
    warmup_yuan: float
    busy_yuan: float
    idle_yuan: float
    cluster_start_yuan: float
    billed_yuan: float
    utilization: float
    wall_seconds: float
    ray_init_seconds: float
    items: list[BilledItem]

    @property
    def parts_yuan(self) -> dict[str, float]:
        return {"model_load": self.model_load_yuan, "warmup": self.warmup_yuan, "busy": self.busy_yuan,
                "idle": self.idle_yuan, "cluster_start": self.cluster_start_yuan}


def _held(cluster: dict[str, float], gpu_type: str | None) -> dict[str, float]:
    held = {"cpu": float(cluster.get("CPU", 0.0))}
    if cluster.get("GPU", 0.0) and gpu_type:
        held[f"gpu:{gpu_type}"] = float(cluster["GPU"])
    return held


def billed_view(catalog: PriceCatalog, *, records: list[LedgerRecord], startups: list[LedgerRecord],
                wall_seconds: float, ray_init_seconds: float, cluster: dict[str, float],
                gpu_type: str | None) -> BilledView:
    """The billed view of a render: ``records`` (its ledger: the nodes), ``startups`` (its model
    actors' ``model_load`` / ``warmup`` rows), on ``cluster`` (Ray's resources; ``gpu_type`` prices
    its GPUs) for ``wall_seconds`` after a Ray start of ``ray_init_seconds``."""
    for r in startups:
        if r.stage not in STARTUP_STAGES:
            raise ValueError(f"startup row of stage {r.stage!r}: expected one of {', '.join(STARTUP_STAGES)}")
    held = _held(cluster, gpu_type)
    executed = [r for r in records if not r.cached]
    resources = list(held) + sorted({r.resource for r in executed + startups} - set(held))
    items, yuan = [], dict.fromkeys(("model_load", "warmup", "busy", "idle", "cluster_start"), 0.0)
    for res in resources:
        def used(rows, stage=None):
            return sum(r.seconds * r.units for r in rows if r.resource == res and stage in (None, r.stage))
        units = held.get(res, 0.0)
        load, warm, busy = used(startups, "model_load"), used(startups, "warmup"), used(executed)
        item = BilledItem(resource=res, units=units, held_s=units * wall_seconds, model_load_s=load,
                          warmup_s=warm, busy_s=busy, idle_s=max(units * wall_seconds - load - warm - busy, 0.0),
                          cluster_start_s=units * ray_init_seconds)
        items.append(item)
        yuan["model_load"] += sum(r.yuan for r in startups if r.resource == res and r.stage == "model_load")
        yuan["warmup"] += sum(r.yuan for r in startups if r.resource == res and r.stage == "warmup")
        yuan["busy"] += sum(r.yuan for r in executed if r.resource == res)
        yuan["idle"] += catalog.cost(item.idle_s, res, 1.0) if item.idle_s else 0.0
        yuan["cluster_start"] += catalog.cost(item.cluster_start_s, res, 1.0) if item.cluster_start_s else 0.0
    billed = sum(yuan.values())
    attributed = yuan["busy"]  # the nodes' rows (cached ones are ¥0): the ledger's total, summed per resource
    return BilledView(attributed_yuan=attributed, model_load_yuan=yuan["model_load"], warmup_yuan=yuan["warmup"],
                      busy_yuan=yuan["busy"], idle_yuan=yuan["idle"], cluster_start_yuan=yuan["cluster_start"],
                      billed_yuan=billed, utilization=attributed / billed if billed else 0.0,
                      wall_seconds=wall_seconds, ray_init_seconds=ray_init_seconds, items=items)
