"""``anim runs``, ``anim compare`` and ``anim calibrate``: the engineers' view of renders recorded in MLflow.

Each command takes the settings the CLI callback resolved once (``ctx.obj``).
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

out = Console()
err = Console(stderr=True)
QUALITY = ("audit_psnr_db", "audit_ssim", "flicker")


def _client(tracking_uri: str):
    """The MLflow client of the resolved tracking URI (a new SQLite store created safely, under
    its lock); one line and exit 2 if it cannot be used."""
    from pipeline.tracking import TrackingError, client

    try:
        return client(tracking_uri)
    except TrackingError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from None


def _fail(what: str) -> typer.Exit:
    err.print(f"[bold red]error:[/] {escape(what)}", soft_wrap=True, highlight=False)
    return typer.Exit(2)


def _find(client, run_ref: str):
    """A run by id, or by a unique prefix of the id among recent runs."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_ref)
    except MlflowException:
        pass
    exps = [e.experiment_id for e in client.search_experiments()]
    matches = [r for r in client.search_runs(exps, max_results=1000, order_by=["attributes.start_time DESC"])
               if r.info.run_id.startswith(run_ref)] if exps else []
    if len(matches) != 1:
        what = "no run" if not matches else f"{len(matches)} runs"
        raise _fail(f"{what} with id {run_ref!r} in {client.tracking_uri}")
    return matches[0]


def _ledger(client, run) -> tuple[dict[str, dict[str, float]], set[str]]:
    """shot -> stage -> yuan from the run's ledger table, and the shots all of whose rows were
    store hits (cached: they cost nothing in this run because an earlier one paid)."""
    from mlflow.exceptions import MlflowException

    try:
        path = Path(client.download_artifacts(run.info.run_id, "ledger.json"))
        data = json.loads(path.read_text())
    except (MlflowException, OSError, ValueError):
        raise _fail(f"run {run.info.run_id[:8]} ({run.info.status}) has no ledger.json: "
                    "it has not finished, or was not logged by `anim render`") from None
    cols = data["columns"]
    table: dict[str, dict[str, float]] = {}
    hits: dict[str, list[bool]] = {}
    for row in data["data"]:
        rec = dict(zip(cols, row))
        shot = rec["shot"] or "(episode)"
        table.setdefault(shot, {})
        table[shot][rec["stage"]] = table[shot].get(rec["stage"], 0.0) + float(rec["yuan"])
        hits.setdefault(shot, []).append(bool(rec.get("cached")))
    return table, {shot for shot, cached in hits.items() if all(cached)}


def _delta(a: float, b: float, *, a_cached: bool = False, b_cached: bool = False) -> tuple[str, str]:
    """Δ ¥ and Δ %; a shot taken from the store in one run says so instead of −100 %."""
    if b_cached and not a_cached:
        pct = "cached"
    elif a_cached and not b_cached:
        pct = "A cached"
    else:
        pct = "—" if a == 0 else f"{(b - a) / a:+.1%}"
    return f"{b - a:+.6f}", pct


def _housekeeping(client, settings, experiment_ids: list[str]) -> None:
    """What ``anim runs`` finds and puts right before it lists: renders whose record waits in
    the artifact store's spool are logged, runs whose driver is gone are closed as KILLED."""
    from pipeline.store import open_store
    from pipeline.tracking import Spool, close_abandoned, relog_pending, summary

    try:
        store = open_store(settings.store, create_parents=settings.sources.get("store", "default") == "default")
        done = relog_pending(client, settings.tracking_uri, Spool(store.url), store=store)
    except Exception as exc:  # the spool's store is unreachable: list what MLflow has
        err.print(f"[yellow]warning:[/] pending renders not checked: {escape(summary(exc))}", soft_wrap=True,
                  highlight=False)
    else:
        if done.run_ids:
            err.print(f"logged {len(done.run_ids)} render(s) that were waiting for MLflow: "
                      f"{', '.join(r[:8] for r in done.run_ids)}", soft_wrap=True, highlight=False)
        for problem in done.problems:
            err.print(f"[yellow]warning:[/] {escape(problem)}", soft_wrap=True, highlight=False)
    if experiment_ids:
        closed = close_abandoned(client, experiment_ids)
        if closed:
            err.print(f"closed {len(closed)} run(s) whose driver is gone as KILLED: "
                      f"{', '.join(r[:8] for r in closed)}", soft_wrap=True, highlight=False)


def _status(run) -> str:
    """MLflow's status with why it stopped, or how far a running render has got."""
    status, m, t = run.info.status, run.data.metrics, run.data.tags
    if status == "RUNNING" and "shots" in m:
        return f"RUNNING {int(m.get('shots_done', 0))}/{int(m['shots'])}"
    stopped = t.get("stopped")
    return f"{status} ({stopped})" if stopped else status


def _row(run, series: str) -> dict[str, Any]:
    m, t = run.data.metrics, run.data.tags
    spent = m.get("cost_yuan", m.get("spent_yuan"))
    return {"run_id": run.info.run_id, "started": run.info.start_time / 1000, "series": series,
            "script": t.get("script", ""), "aspect": t.get("aspect", run.data.params.get("profile.aspect", "")),
            "profile": t.get("profile", ""), "status": _status(run), "mlflow_status": run.info.status,
            "stopped": t.get("stopped"), "cost_yuan": spent,
            "episode_spent_yuan": m.get("episode_spent_yuan", spent if "budget_yuan" in m else None),
            "budget_yuan": m.get("budget_yuan"), "cost_yuan_per_min": m.get("cost_yuan_per_min"),
            "cache_hit_ratio": m.get("cache_hit_ratio"), "audit_psnr_db": m.get("audit_psnr_db"),
            "wall_seconds": m.get("wall_seconds")}


def runs(ctx: typer.Context,
         limit: int = typer.Option(15, "--limit", "-n", help="How many recent renders."),
         experiment: str | None = typer.Option(None, "--series", help="Only this series (MLflow experiment)."),
         as_json: bool = typer.Option(False, "--json", help="Print the renders as JSON.")) -> None:
    """List recent renders with their script, aspect, status, cost, budget, cache use and quality.

    First logs renders whose record is still waiting for MLflow (the tracking server was down
    when they ended) and closes as KILLED the runs whose driver is gone."""
    client = _client(ctx.obj.tracking_uri)
    exps = {e.experiment_id: e.name for e in client.search_experiments()}
    ids = [i for i, name in exps.items() if experiment in (None, name)]
    _housekeeping(client, ctx.obj, ids)
    exps = {e.experiment_id: e.name for e in client.search_experiments()}  # a re-logged render may add one
    ids = [i for i, name in exps.items() if experiment in (None, name)]
    found = client.search_runs(ids, max_results=limit, order_by=["attributes.start_time DESC"]) if ids else []
    rows = [_row(r, exps.get(r.info.experiment_id, "?")) for r in found]
    if as_json:
        typer.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    table = Table(title=escape(f"recent renders — {client.tracking_uri}"))
    right = ("¥", "spent / budget", "¥/min", "cache hits", "PSNR dB", "wall s")
    for col in ("run", "started", "series", "script", "aspect", "profile", "status", *right):
        table.add_column(col, justify="right" if col in right else "left", no_wrap=col not in ("series", "script"),
                         max_width=24 if col in ("series", "script") else None, overflow="ellipsis")
    number = lambda value, fmt: "" if value is None else format(value, fmt)  # noqa: E731
    for r in rows:
        budget = "" if r["budget_yuan"] is None else f"{r['episode_spent_yuan']:.5f} / {r['budget_yuan']:.5f}"
        table.add_row(r["run_id"][:8], datetime.fromtimestamp(r["started"]).strftime("%m-%d %H:%M"),
                      *(escape(r[k]) for k in ("series", "script", "aspect", "profile", "status")),
                      number(r["cost_yuan"], ".5f"), budget, number(r["cost_yuan_per_min"], ".5f"),
                      number(r["cache_hit_ratio"], ".0%"), number(r["audit_psnr_db"], ".2f"),
                      number(r["wall_seconds"], ".1f"))
    out.print(table)


def compare(ctx: typer.Context,
            run_a: str = typer.Argument(..., help="Baseline run id (or unique prefix)."),
            run_b: str = typer.Argument(..., help="Run to compare with it."),
            as_json: bool = typer.Option(False, "--json", help="Print the deltas as JSON.")) -> None:
    """Per-stage and per-shot cost deltas of two renders, in ¥ and %, with quality beside them.
    A shot one run took from the artifact store is marked "cached", not shown as −100 %."""
    client = _client(ctx.obj.tracking_uri)
    a, b = _find(client, run_a), _find(client, run_b)
    ma, mb = a.data.metrics, b.data.metrics
    stages = sorted({k[5:-5] for k in list(ma) + list(mb) if k.startswith("cost.") and k.endswith("_yuan")})
    (la, ca), (lb, cb) = _ledger(client, a), _ledger(client, b)
    shots = list(dict.fromkeys(list(la) + list(lb)))
    result: dict[str, Any] = {
        "a": a.info.run_id, "b": b.info.run_id,
        "total": {"a": ma.get("cost_yuan", 0.0), "b": mb.get("cost_yuan", 0.0)},
        "stages": {s: {"a": ma.get(f"cost.{s}_yuan", 0.0), "b": mb.get(f"cost.{s}_yuan", 0.0)} for s in stages},
        "shots": {s: {"a": sum(la.get(s, {}).values()), "b": sum(lb.get(s, {}).values()),
                      "a_cached": s in ca, "b_cached": s in cb} for s in shots},
        "quality": {q: {"a": ma.get(q), "b": mb.get(q)} for q in QUALITY if q in ma or q in mb},
    }
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    for title, rows in (("stage", result["stages"]), ("shot", result["shots"]),
                        ("total", {"episode": result["total"]})):
        table = Table(title=f"{title} cost: {a.info.run_id[:8]} → {b.info.run_id[:8]}")
        for col in (title, "A ¥", "B ¥", "Δ ¥", "Δ %"):
            table.add_column(col, justify="left" if col == title else "right")
        for name, v in rows.items():
            table.add_row(name, f"{v['a']:.6f}", f"{v['b']:.6f}",
                          *_delta(v["a"], v["b"], a_cached=v.get("a_cached", False), b_cached=v.get("b_cached", False)))
        out.print(table)
    if result["quality"]:
        out.print("quality: " + "; ".join(f"{q} {v['a'] if v['a'] is None else round(v['a'], 4)} → "
                                          f"{v['b'] if v['b'] is None else round(v['b'], 4)}"
                                          for q, v in result["quality"].items()))


def calibrate(ctx: typer.Context,
              last: int = typer.Option(20, "--runs", "-n", help="Use the last N complete renders."),
              experiment: str | None = typer.Option(None, "--series", help="Only renders of this series."),
              dry_run: bool = typer.Option(False, "--dry-run", help="Print the rows, do not write them."),
              table_only: bool = typer.Option(False, "--table-only", help="Write the user table only, not this "
                                              "cluster's learned rows.")) -> None:
    """Refit this cluster's calibration deliberately from the nodes measured in recent renders recorded in MLflow.

    The rows go to the user table (the ``user_calibration`` setting, by default
    ``~/.local/share/anim-pipeline/calibration.csv``), where they win over the shipped rows with
    the same key; the shipped table is never written. The pooled nodes are also filed as a refit
    in this cluster's history in the artifact store (the renders chosen are taken as this
    cluster's): its learned rows, which every render keeps current and which win over both
    tables, start again from this refit.
    """
    from pipeline.config import shipped_table

    settings = ctx.obj
    target = Path(settings.user_calibration)
    if target.resolve() == shipped_table("calibration.csv").resolve():
        err.print(f"[bold red]error:[/] user_calibration ({settings.sources.get('user_calibration')}) is the "
                  f"shipped table {target}; `anim calibrate` writes only this machine's own table")
        raise typer.Exit(2)

    from pipeline.calibrate import fit_rows
    from pipeline.calibration import Calibration
    from pipeline.models import Ledger, LedgerRecord, RenderPlan

    client = _client(settings.tracking_uri)
    exps = {e.experiment_id: e.name for e in client.search_experiments()}
    ids = [i for i, name in exps.items() if experiment in (None, name)]
    found = client.search_runs(ids, max_results=5 * last, order_by=["attributes.start_time DESC"]) if ids else []
    complete = [r for r in found if r.data.tags.get("status") == "complete" or r.data.tags.get("purpose") == "calibration"]
    renders, skipped = [], 0
    for run in complete[:last]:
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        if not {"plan.json", "ledger.json"} <= names:
            continue
        try:
            plan = RenderPlan.model_validate_json(Path(client.download_artifacts(run.info.run_id, "plan.json")).read_text())
        except ValueError:  # a plan written by an older schema: its work units cannot be trusted
            skipped += 1
            continue
        data = json.loads(Path(client.download_artifacts(run.info.run_id, "ledger.json")).read_text())
        ledger = Ledger(records=[LedgerRecord(**dict(zip(data["columns"], row))) for row in data["data"]])
        renders.append((plan, ledger, run.info.run_id[:8]))
    if not renders:
        err.print(f"[bold red]error:[/] no complete render with plan.json and ledger.json in {settings.tracking_uri}")
        raise typer.Exit(2)
    if skipped:
        err.print(f"skipped {skipped} renders whose plan.json has an older layout")
    rows = fit_rows(renders, origin=f"anim calibrate over {len(renders)} MLflow renders")
    table = Table(title=f"calibration from {len(renders)} renders")
    for col in ("stage", "backend", "device", "overhead s", "s/(unit·Mpx)"):
        table.add_column(col, justify="right" if "s" in col.split()[-1] and col != "stage" else "left")
    for r in rows:
        table.add_row(r.stage, r.backend, r.device, f"{r.overhead_s:.4f}", f"{r.seconds_per_unit_mpx:.5f}")
    out.print(table)
    if dry_run:
        return
    written = Calibration.load(target).write(rows)
    out.print(f"wrote {len(rows)} rows to {written} (over the shipped {settings.calibration})",
              soft_wrap=True, highlight=False, markup=False)
    if not table_only:
        _file_refit(settings, renders)


def _file_refit(settings, renders) -> None:
    """The refit's pooled nodes into this cluster's history: learning restarts from them."""
    from stages.records import AnimError

    from pipeline.calibrate import refit_measurements
    from pipeline.calibration import ClusterHistory
    from pipeline.fingerprint import fingerprint
    from pipeline.store import open_store

    fp = fingerprint(settings.ray_address, settings.num_cpus)
    try:  # a store the user named must exist, as for a render
        store = open_store(settings.store, create_parents=settings.sources.get("store", "default") == "default")
        history = ClusterHistory(store.url, fp)
        history.add(refit_measurements(renders, fingerprint=fp))
    except AnimError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2)
    out.print(f"filed the refit as this cluster's learned rows ({fp.label}) in {history.location}: "
              "the next plan prices from it, and every render keeps it current", soft_wrap=True, highlight=False,
              markup=False)
