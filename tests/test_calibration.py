"""Calibration per cluster, kept current by every render (#10.1, #10.2).

What is asserted here does not depend on how fast this machine is: after a render, this
cluster's rows are exactly the fit of that render's measured nodes; a plan of another script
prices every stage from them (each figure recomputed from its row and its price); the band is
computed from the fits' residuals and the spread across renders; the measurements live in the
artifact store where gc and stats never touch them. How close the estimates come to measured
cost is printed side by side by ``experiments/estimate_error.py``, never asserted.
"""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.calibrate import (COVERAGE, MIN_NODES, WINDOW, band_of, cluster_calibration, estimate_band, fit,
                                fit_nodes, fit_residual, learn, learned_row, misses, plan_misses, predict, record_render,
                                refit_measurements, render_measurements, samples)
from pipeline.calibration import Calibration, CalibrationError, ClusterHistory, Measurements
from pipeline.config import resolve_profile
from pipeline.fingerprint import Fingerprint, fingerprint, gpu_models
from pipeline.models import Ledger, LedgerRecord, RenderPlan
from pipeline.plan import make_plan, shot_work, stage_rows
from pipeline.store import open_store
from stages.script import load_episode

from .conftest import REPO

SHIPPED = REPO / "cluster" / "calibration.csv"
SHOTLIST = REPO / "examples" / "shotlist.yaml"
ZH = REPO / "examples" / "episode_zh.fountain"
HERE = Fingerprint(kind="local", cpu="Test CPU 9000", cores=4, gpu=None)


def measurements(work: list[float], seconds: list[float], *, at: float, kind: str = "render",
                 fp: Fingerprint = HERE, key=("keyframes", "previz", "cpu", "keyframe")) -> Measurements:
    stage, backend, device, unit = key
    return Measurements(kind=kind, stage=stage, backend=backend, device=device, unit=unit, work=work,
                        seconds=seconds, at=at, fingerprint=fp, runs=[f"run{int(at)}"])


# --------------------------------------------------------------------------- the fingerprint


def test_fingerprint_names_the_machine_shape_and_an_existing_cluster_by_its_address(tmp_path):
    a, b = fingerprint(None, 3), fingerprint(None, 3)
    assert a == b and a.id == b.id and len(a.id) == 12 and a.kind == "local" and a.cores == 3
    assert fingerprint(None, 4).id != a.id  # another core count measures differently
    assert a.cpu and a.cpu in a.label and "3 cores" in a.label
    remote = fingerprint(" ray://head:10001 ", None)
    assert (remote.kind, remote.address, remote.cpu, remote.gpu) == ("address", "ray://head:10001", None, None)
    assert remote.label == "Ray cluster at ray://head:10001" and remote.id != a.id
    assert fingerprint("10.0.0.2:6379", None).id != remote.id


def test_gpus_come_from_nvidia_smi_and_none_without_it(tmp_path):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\nprintf 'NVIDIA H200\\nNVIDIA H200\\nNVIDIA L4\\n'\n")
    smi.chmod(0o755)
    assert gpu_models(str(smi)) == "2x NVIDIA H200 + 1x NVIDIA L4"
    broken = tmp_path / "broken-smi"
    broken.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    broken.chmod(0o755)
    assert gpu_models(str(broken)) is None
    assert gpu_models(str(tmp_path / "absent")) is None
    with_gpu = fingerprint(None, 2, nvidia_smi=str(smi))
    assert with_gpu.gpu == "2x NVIDIA H200 + 1x NVIDIA L4" and with_gpu.id != fingerprint(None, 2, nvidia_smi=str(broken)).id
    assert "2x NVIDIA H200" in with_gpu.label


# --------------------------------------------------------------------------- learning: median, window, refit, band


def test_fit_recovers_a_line_and_goes_through_the_origin_below_eight_nodes():
    xs = [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]
    overhead, slope = fit(xs, [0.2 + 0.3 * x for x in xs])
    assert overhead == pytest.approx(0.2) and slope == pytest.approx(0.3)
    overhead, slope = fit(xs[:3], [0.2 + 0.3 * x for x in xs[:3]])
    assert overhead == 0.0 and slope == pytest.approx(sum(x * (0.2 + 0.3 * x) for x in xs[:3]) / sum(x * x for x in xs[:3]))


# A keyframe node of u drawings at m Mpx each: 50 ms to start, 10 ms per drawing, 200 ms per drawing·Mpx.
TRUE = (0.05, 0.01, 0.2)
DRAFT, STANDARD = 640 * 360 / 1e6, 1280 * 720 / 1e6
UNITS = [1, 2, 3, 5, 8, 13, 4, 6]


def node_seconds(u: float, mpx: float, theta=TRUE) -> float:
    return theta[0] + theta[1] * u + theta[2] * u * mpx


def nodes_of(units: list[int], mpx: float, *, at: float, slower: float = 1.0, script: str = "a" * 64) -> Measurements:
    """One render's keyframe nodes, exactly as TRUE prices them (``slower`` times that: a loaded machine)."""
    return Measurements(stage="keyframes", backend="previz", device="cpu", unit="keyframe", units=units,
                        work=[u * mpx for u in units], seconds=[slower * node_seconds(u, mpx) for u in units], at=at,
                        fingerprint=HERE, runs=[f"run{int(at)}"], script_sha256=script)


def test_nodes_at_two_resolutions_tell_the_overhead_the_per_unit_and_the_per_pixel_cost_apart():
    units = UNITS * 2
    work = [u * DRAFT for u in UNITS] + [u * STANDARD for u in UNITS]
    seconds = [node_seconds(u, w / u) for u, w in zip(units, work)]
    assert fit_nodes(units, work, seconds) == pytest.approx(TRUE, rel=1e-9)
    # One resolution cannot tell a per-unit cost from a per-pixel one: it is all per pixel, as in a table row.
    overhead, per_unit, per_mpx = fit_nodes(UNITS, [u * DRAFT for u in UNITS], seconds[:8])
    assert per_unit == 0.0 and overhead == pytest.approx(TRUE[0], rel=1e-9)
    assert per_mpx == pytest.approx(TRUE[1] / DRAFT + TRUE[2], rel=1e-9)
    # Below MIN_NODES nodes: through the origin on work alone (x·y / x·x).
    xs, ys = work[:3], seconds[:3]
    assert fit_nodes(units[:3], xs, ys) == pytest.approx((0.0, 0.0, sum(x * y for x, y in zip(xs, ys))
                                                         / sum(x * x for x in xs)), rel=1e-12)
    assert MIN_NODES == 8
    # Every node the same units (a panel per shot; one script's assembly of 13 shots, rendered again):
    # a fixed cost cannot be told from a per-unit one, and it is taken per unit, so that it scales.
    panels = [0.083] * 4 + [0.262] * 4
    assert fit_nodes([1] * 8, panels, [0.02 + 0.1 * m for m in panels]) == pytest.approx((0.0, 0.02, 0.1), rel=1e-9)
    assert fit_nodes([13] * 8, panels, [0.78 + 0.1 * m for m in panels]) == pytest.approx((0.0, 0.06, 0.1), rel=1e-9)
    # With two unit counts the nodes tell them apart again.
    shots, mixed = [13] * 4 + [4] * 4, [0.083, 0.262] * 4
    assert fit_nodes(shots, mixed, [0.1 + 0.05 * u + 0.1 * m for u, m in zip(shots, mixed)]) == pytest.approx(
        (0.1, 0.05, 0.1), rel=1e-9)
    # Never negative: a falling line keeps overhead 0 and refits the slope alone.
    xs = [1.0, 2, 3, 4, 5, 6, 7, 8]
    assert fit_nodes(None, xs, [2.0 * x - 1.0 for x in xs]) == pytest.approx(
        (0.0, 0.0, sum(x * (2 * x - 1) for x in xs) / sum(x * x for x in xs)), rel=1e-12)


def test_a_row_fits_every_renders_nodes_together_and_leaves_a_loaded_render_out():
    history = [nodes_of(UNITS[:5], DRAFT, at=500.0), nodes_of(UNITS, STANDARD, at=400.0),
               nodes_of(UNITS, DRAFT, at=300.0, slower=3.0),  # a render on a loaded machine
               nodes_of(UNITS, STANDARD, at=200.0), nodes_of(UNITS, DRAFT, at=100.0)]
    assert learn(history) == pytest.approx(TRUE, rel=1e-9)  # the loaded render neither drags nor bends it
    row = learned_row(history)
    assert (row.overhead_s, row.seconds_per_unit, row.seconds_per_unit_mpx) == pytest.approx(TRUE, rel=1e-9)
    assert row.seconds(13, STANDARD) == pytest.approx(node_seconds(13, STANDARD), rel=1e-9)
    assert row.marginal(13, STANDARD) == pytest.approx(node_seconds(13, STANDARD) - TRUE[0], rel=1e-9)
    # What it missed by on each render left out of the fit (one script: each without itself): the
    # loaded render 3×, the others nothing; the band holds COVERAGE of them.
    assert row.misses == pytest.approx({"500.000": 1.0, "400.000": 1.0, "300.000": 3.0, "200.000": 1.0,
                                        "100.000": 1.0}, rel=1e-9)
    assert row.band == pytest.approx(band_of(list(row.misses.values())), rel=1e-12)
    assert row.band == pytest.approx(2.0, rel=1e-9)  # 5 renders: the ⌈0.8·6⌉ = 5th smallest miss, the 3×
    assert row.renders == 5 and "5 render(s) fitted together" in row.source and "one script" in row.source
    # One render: nothing left out, the band is its fit residual and the row says so.
    one = learned_row(history[:1])
    assert one.misses == {} and one.band == fit_residual(learn(history[:1]), history[0]) > 0  # 5 nodes: through 0
    assert "fewer than 2 renders" in one.source


def test_with_several_scripts_a_render_is_missed_by_the_rows_of_the_other_scripts():
    a = [nodes_of(UNITS, DRAFT, at=100.0), nodes_of(UNITS, STANDARD, at=200.0)]
    b = [nodes_of(UNITS[:4], DRAFT, at=300.0, slower=1.2, script="b" * 64)]
    missed = misses(a + b)
    assert missed["300.000"] == pytest.approx(1.2, rel=1e-9)  # from script a's renders alone
    assert missed["100.000"] == sum(a[0].seconds) / predict(learn(b), a[0])  # from script b's render alone
    assert set(missed) == {"100.000", "200.000", "300.000"}


def test_the_band_is_the_conformal_rank_of_the_misses():
    ratios = [1.1, 0.9, 1.2, 1 / 1.3, 1.05]
    assert band_of(ratios) == pytest.approx(0.3)  # n = 5: rank ⌈0.8·6⌉ = 6 > 5, the largest
    ten = [1.0 + i / 100 for i in range(1, 11)]  # 1.01 … 1.10
    assert band_of(ten) == pytest.approx(0.09)  # rank ⌈0.8·11⌉ = 9
    assert band_of([]) == 0.0 and COVERAGE == 0.8


def test_a_plans_band_is_what_its_stages_missed_by_together_on_each_render_left_out(prices):
    """Per render left out, the plan's ¥ per stage weights its rows' misses; the band holds COVERAGE
    of those totals. A render that measured stages under half the ¥ is not counted."""
    shipped = Calibration.load(SHIPPED)
    draft = resolve_profile("draft")
    keys = {(stage, backend, device) for stage, (backend, device, _) in
            __import__("pipeline.plan", fromlist=["calibration_keys"]).calibration_keys(draft).items()}
    missed = {"1.000": 1.5, "2.000": 0.8, "3.000": 1.1}
    rows = [r.model_copy(update={"renders": 3, "band": 0.5,
                                 "misses": ({k: v for k, v in missed.items()} if r.stage == "keyframes" else
                                            {"1.000": 1.0, "2.000": 1.0} if r.stage != "voice" else {"4.000": 9.0})})
            for r in shipped.rows if (r.stage, r.backend, r.device) in keys]
    cal = shipped.overlay(rows, cluster=HERE.label, location="(test)")
    plan = make_plan(load_episode(SHOTLIST), draft, calibration=cal, prices=prices, script_sha256="0" * 64)
    by_stage = plan.estimate_by_stage()
    row_of = {s: ("keyframes" if s in ("audit", "plates", "sheets") else s) for s in by_stage}
    total = sum(by_stage.values())
    expected = []
    for rid in ["1.000", "2.000", "3.000", "4.000"]:
        have = {s: y for s, y in by_stage.items() if rid in next(r for r in rows if r.stage == row_of[s]).misses}
        if sum(have.values()) >= 0.5 * total:
            expected.append(sum(y * next(r for r in rows if r.stage == row_of[s]).misses[rid]
                                for s, y in have.items()) / sum(have.values()))
    band = estimate_band(plan, cal)
    assert band.held_out == len(expected) == 2  # render 3 measured only the keyframes, render 4 only voices
    assert plan_misses({s: (y, next(r for r in rows if r.stage == row_of[s])) for s, y in by_stage.items()}) == \
        pytest.approx(expected, rel=1e-12)
    assert band.band == pytest.approx(band_of(expected), rel=1e-9) and band.cluster_yuan == pytest.approx(total)
    assert "meant to hold 80% of renders" in band.line() and band.summary()["coverage"] == COVERAGE


def test_history_keeps_the_newest_window_per_key_back_to_a_refit(tmp_path):
    history = ClusterHistory(tmp_path / "store", HERE)
    other_key = ("encode", "x264:veryfast", "cpu", "frame")
    history.add([measurements([1.0], [0.1 * i], at=1000.0 + i) for i in range(1, WINDOW + 3)])
    history.add([measurements([1.0], [9.0], at=500.0, key=other_key)])
    recent, ignored = history.recent(WINDOW)
    assert not ignored and set(recent) == {("keyframes", "previz", "cpu", "keyframe"), other_key}
    kept = recent[("keyframes", "previz", "cpu", "keyframe")]
    assert [m.at for m in kept] == [1000.0 + i for i in range(WINDOW + 2, 2, -1)]  # newest WINDOW, newest first
    # A deliberate refit: learning starts again from it.
    history.add([measurements([1.0, 2.0], [0.5, 1.0], at=2000.0, kind="refit"),
                 measurements([1.0], [0.7], at=2001.0)])
    kept = history.recent(WINDOW)[0][("keyframes", "previz", "cpu", "keyframe")]
    assert [(m.at, m.kind) for m in kept] == [(2001.0, "render"), (2000.0, "refit")]
    # Files of another month of the same key are found too, newest month first.
    history.add([measurements([1.0], [0.3], at=1.9e9)])  # 2030
    assert history.recent(WINDOW)[0][("keyframes", "previz", "cpu", "keyframe")][0].at == 1.9e9


def test_a_damaged_measurements_file_is_left_out_and_named(tmp_path):
    history = ClusterHistory(tmp_path / "store", HERE)
    [good] = history.add([measurements([1.0, 2.0], [0.1, 0.2], at=100.0)])
    folder = Path(good).parent
    (folder / "0000000000200-aaaaaaaaaaaa.json").write_text("{not json")
    (folder / ".0000000000300-bbbbbbbbbbbb.json.tmp").write_text("half a write")  # a write in progress
    recent, ignored = history.recent(WINDOW)
    assert [m.at for m in recent[("keyframes", "previz", "cpu", "keyframe")]] == [100.0]
    assert len(ignored) == 1 and "0000000000200-aaaaaaaaaaaa.json: not a measurements file" in ignored[0]
    assert (folder / "0000000000200-aaaaaaaaaaaa.json").exists()  # left for a person to look at, not removed


@pytest.mark.parametrize("layout", ["local", "remote"])
def test_measurements_live_beside_the_artifacts_and_cache_gc_never_touches_them(tmp_path, layout):
    location = str(tmp_path / "store") if layout == "local" else f"memory://anim-cal-{uuid.uuid4().hex[:12]}"
    store = open_store(location, local_cache=tmp_path / "rt")
    key = "ab" + "0" * 62
    with store.writer(key, {"stage": "keyframes"}) as d:
        (d / "kf.png").write_bytes(b"x" * 100)
    history = ClusterHistory(store.url, HERE)
    history.add([measurements([1.0, 2.0], [0.1, 0.2], at=100.0)])
    before = store.stats()
    assert (before.entries, before.damaged, before.staging) == (1, 0, 0)  # not an entry, not a leftover
    report = store.gc(older_than_s=0, max_bytes=0)
    assert [item.what for item in report.removed] == [key]  # the artifact goes, the measurements stay
    recent, ignored = ClusterHistory(location, HERE).recent(WINDOW)
    assert not ignored and recent[("keyframes", "previz", "cpu", "keyframe")][0].seconds == [0.1, 0.2]
    assert store.stats().entries == 0
    assert history.location.endswith(f"calibration/{HERE.id}")


def test_this_clusters_rows_win_over_the_user_table_which_wins_over_the_shipped_one(tmp_path):
    user = tmp_path / "user.csv"
    shipped = Calibration.load(SHIPPED)
    kf = shipped.row("keyframes", "previz", "cpu")
    enc = shipped.row("encode", "x264:veryfast", "cpu")
    Calibration.load(user).write([kf.model_copy(update={"seconds_per_unit_mpx": 7.0, "source": "user"}),
                                  enc.model_copy(update={"seconds_per_unit_mpx": 8.0, "source": "user"})])
    ClusterHistory(tmp_path / "store", HERE).add([measurements([1.0, 2.0], [0.5, 1.0], at=100.0)])
    layered = cluster_calibration(Calibration.load(SHIPPED, user), str(tmp_path / "store"), HERE)
    assert layered.row("keyframes", "previz", "cpu").seconds_per_unit_mpx == pytest.approx(0.5, rel=1e-12)  # this cluster's
    assert layered.row("keyframes", "previz", "cpu").renders == 1
    assert layered.row("encode", "x264:veryfast", "cpu").seconds_per_unit_mpx == 8.0  # the user table's
    assert layered.row("storyboard", "previz", "cpu") == shipped.row("storyboard", "previz", "cpu")
    assert layered.cluster == HERE.label and layered.path == str(user)  # `anim calibrate` still writes the table
    # Another cluster's rows are its own: a cluster that never rendered prices from the tables.
    elsewhere = Fingerprint(kind="address", address="ray://elsewhere:10001")
    assert cluster_calibration(Calibration.load(SHIPPED, user), str(tmp_path / "store"), elsewhere).row(
        "keyframes", "previz", "cpu").seconds_per_unit_mpx == 7.0
    # Written tables keep their columns: learned rows' band and renders are not table columns.
    assert user.read_text().splitlines()[0] == "stage,backend,device,unit,overhead_s,seconds_per_unit_mpx,source,measured_at"


def test_a_store_that_cannot_hold_measurements_is_one_error_naming_the_place(tmp_path, prices):
    store = tmp_path / "store"
    store.mkdir()
    (store / "calibration").write_text("a file where the folder should be")
    plan = make_plan(load_episode(SHOTLIST), resolve_profile("draft"), calibration=Calibration.load(SHIPPED),
                     prices=prices, script_sha256="0" * 64)
    ledger = Ledger(records=[LedgerRecord(stage="keyframes", shot=s.shot.id, seconds=0.1, resource="cpu", units=1,
                                          yuan=0.0) for s in plan.shots])
    with pytest.raises(CalibrationError) as exc:
        record_render(str(store), HERE, plan, ledger, run="r1")
    assert str(store / "calibration") in str(exc.value) and "\n" not in str(exc.value)


# --------------------------------------------------------------------------- through the CLI, rendering for real


@pytest.fixture
def cli(tmp_path, monkeypatch):
    """``anim`` in this process, in an environment of its own under tmp_path."""
    from pipeline.cli import app

    monkeypatch.chdir(tmp_path)
    env = {"HOME": str(tmp_path / "home"), "XDG_CONFIG_HOME": str(tmp_path / "config"),
           "XDG_DATA_HOME": str(tmp_path / "data"), "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "COLUMNS": "250",
           "ANIM_STORE": str(tmp_path / "store"),
           **{k: None for k in ("RAY_ADDRESS", "ANIM_APPROVALS", "ANIM_CONFIG", "ANIM_PRICES", "ANIM_CALIBRATION",
                                "ANIM_PRICE_TIER", "ANIM_PRICE_PROVIDER", "ANIM_DEBUG")}}
    runner = CliRunner()

    def anim(*args: str, code: int = 0, **extra: str):
        res = runner.invoke(app, [str(a) for a in args], env=env | extra)
        assert res.exit_code == code, res.output
        assert "Traceback" not in res.output
        return res

    return anim


def rendered(out: Path) -> tuple[RenderPlan, Ledger]:
    """The plan and the measured ledger a render published."""
    plan = RenderPlan.model_validate_json((out / "plan.json").read_text())
    records = json.loads((out / "cost.json").read_text())["records"]
    return plan, Ledger(records=[LedgerRecord(**r) for r in records])


def per_key_fits(plan: RenderPlan, ledger: Ledger) -> dict[tuple[str, str, str], tuple[list, Measurements]]:
    """(stage, backend, device) → (nodes (work, seconds), the render's measurements) of its executed nodes."""
    out = {}
    by_key = {m.key: m for m in render_measurements(plan, ledger, fingerprint=HERE, at=1.0)}
    for (stage, backend, device, unit), pts in samples(plan, ledger).items():
        # every executed node of the stage (the contact sheet, a storyboard node of no shot, has no row of its own)
        # (a shot's lines are one voice sample, by the seconds they speak; the mix and the subtitles are
        # the assembly's, of no shot)
        assert len(pts) == len({(r.stage, r.shot) for r in ledger.records if r.stage == stage and not r.cached
                                and (r.shot is not None or stage in ("assemble", "mix", "subtitles"))})
        m = by_key[(stage, backend, device, unit)]
        assert m.units is not None and len(m.units) == len(pts) and m.work == [w for w, _ in pts]
        out[(stage, backend, device)] = (pts, m)
    return out


def refit_history_nodes(store: str, here: Fingerprint, key: tuple[str, str, str]) -> list[tuple[float, float]]:
    """(work, seconds) of the newest refit of ``key`` in the cluster's history."""
    recent, _ = ClusterHistory(store, here).recent(WINDOW)
    [m] = [ms[0] for k, ms in recent.items() if k[:3] == key]
    assert m.kind == "refit"
    return list(zip(m.work, m.seconds))


def test_a_render_teaches_this_cluster_and_the_next_plan_of_another_script_prices_from_it(
        tmp_path, cli, local_ray, prices):
    store = str(tmp_path / "store")
    here = fingerprint(None, None)  # what the CLI's settings give on this machine

    # 1. Before any render: the plan says it prices from the tables, with no band.
    before = cli("plan", ZH, "--aspect", "9:16").stdout
    assert "calibration: table rows" in before and "no ± band until it renders" in before

    # 2. Render script A. This cluster's rows now exist and are exactly the fit of A's measured nodes.
    res = cli("render", SHOTLIST, "--no-progress", "--out", tmp_path / "a")
    assert f"filed for {here.label}" in res.stdout
    plan_a, ledger_a = rendered(tmp_path / "a")
    fits_a = per_key_fits(plan_a, ledger_a)
    learned = cluster_calibration(Calibration.load(SHIPPED), store, here)
    assert not learned.ignored and len(fits_a) == 8  # 5 picture stages; voice, mix, subtitles
    for (stage, backend, device), (pts, m) in fits_a.items():
        row = learned.row(stage, backend, device)
        theta = learn([m])
        assert (row.overhead_s, row.seconds_per_unit, row.seconds_per_unit_mpx) == pytest.approx(theta, rel=1e-12)
        assert row.renders == 1 and row.misses == {}
        assert row.band == pytest.approx(fit_residual(theta, m), rel=1e-12) and "fewer than 2 renders" in row.source

    # 3. Plan script B (another script, vertical): every stage is priced from those rows, exactly.
    summary = json.loads(cli("plan", ZH, "--aspect", "9:16", "--json").stdout)
    plan_b = make_plan(load_episode(ZH), resolve_profile("draft", {"aspect": "9:16"}), calibration=learned,
                       prices=prices, script_sha256="0" * 64)
    rows = stage_rows(plan_b.profile, learned)
    assert all(r.renders == 1 for r in rows.values())
    for shot in plan_b.shots:
        work = shot_work(plan_b.profile, shot.frames, shot.drawings, shot.keyframes, shot.still_pairs)
        for stage, (units, mpx) in work.items():
            seconds = round(rows[stage].seconds(units, mpx), 4)
            assert shot.estimate_seconds[stage] == seconds
            assert shot.estimate_yuan[stage] == pytest.approx(prices.cost(seconds, "cpu", 1.0), rel=1e-12)
    assert summary["estimated_cost_yuan"] == pytest.approx(plan_b.estimated_cost_yuan, rel=1e-12)
    cal = summary["calibration"]
    assert cal["rows"] == "cluster" and set(cal["stages"].values()) == {"cluster"} and cal["renders"] == 1
    by_stage = plan_b.estimate_by_stage()
    band_row = {s: rows.get(s, rows["keyframes"]) for s in by_stage}  # audit is drawn by the keyframe backend
    assert cal["plus_minus_yuan"] == pytest.approx(sum(by_stage[s] * band_row[s].band for s in by_stage), rel=1e-12)
    assert cal["band"] == pytest.approx(cal["plus_minus_yuan"] / plan_b.estimated_cost_yuan, rel=1e-9)
    text = cli("plan", ZH, "--aspect", "9:16").stdout
    assert f"calibration: this cluster's rows ({here.label}) for every stage: ±{cal['band']:.1%}" in text
    assert "from 1 render fit: no spread across renders yet" in text

    # 4. Render B too: each row is now both renders' nodes fitted together, and what it missed by on
    #    each when fitted without that render's script (two scripts) makes the band.
    cli("render", ZH, "--aspect", "9:16", "--no-progress", "--out", tmp_path / "b")
    fits_b = per_key_fits(*rendered(tmp_path / "b"))
    again = cluster_calibration(Calibration.load(SHIPPED), store, here)
    for key, (_, m_a) in fits_a.items():
        row, m_b = again.row(*key), fits_b[key][1]
        assert (row.overhead_s, row.seconds_per_unit, row.seconds_per_unit_mpx) == pytest.approx(
            learn([m_b, m_a]), rel=1e-9)
        assert sorted(row.misses.values()) == pytest.approx(sorted(
            [sum(m_a.seconds) / predict(learn([m_b]), m_a), sum(m_b.seconds) / predict(learn([m_a]), m_b)]), rel=1e-9)
        assert row.band == pytest.approx(band_of(list(row.misses.values())), rel=1e-12)
        assert row.renders == 2 and "2 render(s) fitted together" in row.source and "each without its script" in row.source
    band_b = estimate_band(plan_b, again)
    assert band_b.renders == 2 and band_b.held_out == 2

    # 5. A deliberate refit from the two MLflow runs: learning starts again from their pooled nodes.
    res = cli("calibrate", "--runs", "2")
    assert "filed the refit as this cluster's learned rows" in res.stdout
    refit = cluster_calibration(Calibration.load(SHIPPED), store, here)
    for key in fits_a:
        m_a, m_b = fits_a[key][1], fits_b[key][1]
        pooled = m_a.model_copy(update={"work": m_a.work + m_b.work, "units": m_a.units + m_b.units,
                                        "seconds": m_a.seconds + m_b.seconds})
        row = refit.row(*key)
        # What MLflow keeps of the plan and the ledger is rounded (work to ~9 significant digits): equal to that.
        got, want = sorted(refit_history_nodes(store, here, key)), sorted(zip(pooled.work, pooled.seconds))
        assert [x for pair in got for x in pair] == pytest.approx([x for pair in want for x in pair], rel=1e-6,
                                                                  abs=1e-12)
        assert (row.overhead_s, row.seconds_per_unit, row.seconds_per_unit_mpx) == pytest.approx(
            learn([pooled]), rel=1e-4, abs=1e-9)
        assert row.renders == 1 and "2 renders, a refit among them" in row.source


def test_a_render_whose_measurements_cannot_be_filed_still_succeeds(tmp_path, cli, local_ray):
    # A file where the keyframe row's folder would go: reading the history finds no rows there, and
    # filing this render's keyframe nodes fails after the render is paid for and published.
    here = fingerprint(None, None)
    [elsewhere] = ClusterHistory(tmp_path / "elsewhere", here).add([measurements([1.0], [0.1], at=1.0, fp=here)])
    in_the_way = tmp_path / "store" / "calibration" / here.id / Path(elsewhere).parent.parent.name
    in_the_way.parent.mkdir(parents=True)
    in_the_way.write_text("in the way")
    res = cli("render", SHOTLIST, "--no-progress", "--out", tmp_path / "out")
    assert (tmp_path / "out" / "episode.mp4").is_file() and "MLflow run:" in res.stdout
    assert "warning: this cluster's calibration was not updated from this render" in res.output
    assert str(in_the_way) in res.output and "filed for" not in res.output
    # A history that cannot even be listed is one error line before any work, never a traceback.
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "calibration").write_text("a file where the folder should be")
    res = cli("plan", SHOTLIST, code=2, ANIM_STORE=str(tmp_path / "broken"))
    assert "cannot list this cluster's measurements" in res.output and len(res.output.strip().splitlines()) == 1


def test_refit_measurements_pool_runs_per_key(prices):
    plan = make_plan(load_episode(SHOTLIST), resolve_profile("draft"), calibration=Calibration.load(SHIPPED),
                     prices=prices, script_sha256="0" * 64)
    ledger = Ledger(records=[LedgerRecord(stage="keyframes", shot=s.shot.id, seconds=0.1 * (i + 1), resource="cpu",
                                          units=1, yuan=0.0) for i, s in enumerate(plan.shots)])
    [one] = render_measurements(plan, ledger, fingerprint=HERE, run="r1", at=5.0)
    assert one.key == ("keyframes", "previz", "cpu", "keyframe") and one.runs == ["r1"]
    assert one.seconds == [0.1 * (i + 1) for i in range(len(plan.shots))] and one.profile == "draft"
    [pooled] = refit_measurements([(plan, ledger, "r1"), (plan, ledger, "r2")], fingerprint=HERE, at=6.0)
    assert (pooled.kind, pooled.renders, pooled.runs) == ("refit", 2, ["r1", "r2"])
    assert pooled.work == one.work * 2 and pooled.seconds == one.seconds * 2
    assert pooled.units == one.units * 2
    row = learned_row([pooled])
    assert (row.overhead_s, row.seconds_per_unit, row.seconds_per_unit_mpx) == learn([pooled])
    assert row.renders == 1 and "2 renders, a refit among them" in row.source


def test_an_attempt_that_did_not_finish_teaches_nothing_and_a_retry_teaches_its_own_time(prices):
    """A node cancelled part-way (the budget cap) or failed and run again bills its partial time; calibration learns
    only from attempts that did the node's whole work."""
    plan = make_plan(load_episode(SHOTLIST), resolve_profile("draft"), calibration=Calibration.load(SHIPPED),
                     prices=prices, script_sha256="0" * 64)
    first, second, third = (s.shot.id for s in plan.shots[:3])

    def row(shot: str, seconds: float, partial: bool = False) -> LedgerRecord:
        return LedgerRecord(stage="keyframes", shot=shot, seconds=seconds, resource="cpu", units=1, yuan=0.0,
                            partial=partial)

    ledger = Ledger(records=[row(first, 1.0), row(second, 0.2, partial=True),  # cancelled at the cap
                             row(third, 0.3, partial=True), row(third, 1.5)])  # failed once, then ran whole
    [m] = render_measurements(plan, ledger, fingerprint=HERE, at=1.0)
    assert m.seconds == [1.0, 1.5]
