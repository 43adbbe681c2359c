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
from rich.table import Table

out = Console()
err = Console(stderr=True)
QUALITY = ("audit_psnr_db", "audit_ssim", "flicker")


def _client(tracking_uri: str):
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    return mlflow.MlflowClient(tracking_uri)


def _find(client, run_ref: str):
    """A run by id, or by a unique prefix of the id among recent runs."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_ref)
    except MlflowException:
        pass
    exps = [e.experiment_id for e in client.search_experiments()]
    matches = [r for r in client.search_runs(exps, max_results=1000, order_by=["attributes.start_time DESC"])
               if r.info.run_id.startswith(run_ref)]
    if len(matches) != 1:
        what = "no run" if not matches else f"{len(matches)} runs"
        err.print(f"[bold red]error:[/] {what} with id {run_ref!r} in {client.tracking_uri}")
        raise typer.Exit(2)
    return matches[0]


def _ledger(client, run) -> dict[str, dict[str, float]]:
    """shot -> stage -> yuan, from the run's ledger table."""
    path = Path(client.download_artifacts(run.info.run_id, "ledger.json"))
    data = json.loads(path.read_text())
    cols = data["columns"]
    table: dict[str, dict[str, float]] = {}
    for row in data["data"]:
        rec = dict(zip(cols, row))
        shot = rec["shot"] or "(episode)"
        table.setdefault(shot, {})
        table[shot][rec["stage"]] = table[shot].get(rec["stage"], 0.0) + float(rec["yuan"])
    return table


def _delta(a: float, b: float) -> tuple[str, str]:
    pct = "—" if a == 0 else f"{(b - a) / a:+.1%}"
    return f"{b - a:+.6f}", pct


def runs(ctx: typer.Context,
         limit: int = typer.Option(15, "--limit", "-n", help="How many recent renders."),
         experiment: str | None = typer.Option(None, "--series", help="Only this series (MLflow experiment).")) -> None:
    """List recent renders with their cost, cache use and quality."""
    client = _client(ctx.obj.tracking_uri)
    exps = {e.experiment_id: e.name for e in client.search_experiments()}
    ids = [i for i, name in exps.items() if experiment in (None, name)]
    found = client.search_runs(ids, max_results=limit, order_by=["attributes.start_time DESC"]) if ids else []
    table = Table(title=f"recent renders — {client.tracking_uri}")
    for col in ("run", "started", "series", "profile", "status", "¥", "¥/min", "cache hits", "PSNR dB", "wall s"):
        table.add_column(col, justify="right" if col in ("¥", "¥/min", "cache hits", "PSNR dB", "wall s") else "left",
                         no_wrap=col != "series", max_width=24 if col == "series" else None,
                         overflow="ellipsis")
    for r in found:
        m, t = r.data.metrics, r.data.tags
        table.add_row(r.info.run_id[:8], datetime.fromtimestamp(r.info.start_time / 1000).strftime("%m-%d %H:%M"),
                      exps.get(r.info.experiment_id, "?"), t.get("profile", ""), t.get("status", ""),
                      f"{m.get('cost_yuan', 0):.5f}", f"{m.get('cost_yuan_per_min', 0):.5f}",
                      f"{m.get('cache_hit_ratio', 0):.0%}", f"{m['audit_psnr_db']:.2f}" if "audit_psnr_db" in m else "",
                      f"{m.get('wall_seconds', 0):.1f}")
    out.print(table)


def compare(ctx: typer.Context,
            run_a: str = typer.Argument(..., help="Baseline run id (or unique prefix)."),
            run_b: str = typer.Argument(..., help="Run to compare with it."),
            as_json: bool = typer.Option(False, "--json", help="Print the deltas as JSON.")) -> None:
    """Per-stage and per-shot cost deltas of two renders, in ¥ and %, with quality beside them."""
    client = _client(ctx.obj.tracking_uri)
    a, b = _find(client, run_a), _find(client, run_b)
    ma, mb = a.data.metrics, b.data.metrics
    stages = sorted({k[5:-5] for k in list(ma) + list(mb) if k.startswith("cost.") and k.endswith("_yuan")})
    la, lb = _ledger(client, a), _ledger(client, b)
    shots = list(dict.fromkeys(list(la) + list(lb)))
    result: dict[str, Any] = {
        "a": a.info.run_id, "b": b.info.run_id,
        "total": {"a": ma.get("cost_yuan", 0.0), "b": mb.get("cost_yuan", 0.0)},
        "stages": {s: {"a": ma.get(f"cost.{s}_yuan", 0.0), "b": mb.get(f"cost.{s}_yuan", 0.0)} for s in stages},
        "shots": {s: {"a": sum(la.get(s, {}).values()), "b": sum(lb.get(s, {}).values())} for s in shots},
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
            table.add_row(name, f"{v['a']:.6f}", f"{v['b']:.6f}", *_delta(v["a"], v["b"]))
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
