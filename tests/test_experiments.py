"""Fast checks of the experiments (no rendering): the cost report's figures trace to one
calibration row and one price row each, naive costs more than optimized, the example GPU
profiles load and plan, the lever sweep's Pareto front is right on a small table, the
in-betweening sets keep their tune and held-out parts apart, and the in-betweening bench checks
each choice only on the parts it was not made on."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from pipeline.config import REPO_ROOT, resolve_profile
from pipeline.plan import make_plan, stage_rows
from stages.script import load_episode

sys.path.insert(0, str(REPO_ROOT / "experiments"))
import cost_report  # noqa: E402
import interp_bench  # noqa: E402
import interp_sets  # noqa: E402
import sweep_levers  # noqa: E402

GPU = "A100-80GB"  # has published rows for both example profiles and a spot price row




@pytest.fixture(scope="module")
def minute_episode():
    return cost_report.repeat_episode(load_episode(REPO_ROOT / "examples" / "episode_en.fountain"), 90.0)


def test_repeat_episode_reaches_the_duration_with_unique_ids(minute_episode):
    assert minute_episode.duration_s == pytest.approx(90.0, abs=0.01)
    ids = [s.id for s in minute_episode.shots]
    assert len(ids) == len(set(ids))
    locations = [sc.location for sc in minute_episode.scenes]
    assert any("#2" in loc for loc in locations)  # the second pass through the script is a new set


def test_the_reports_episode_is_as_long_as_its_name_once_planned(calibration, prices):
    """The cut follows the voice, so the written length is not the plan's: the report's 3-minute
    episode is the repetition whose plan lasts closest to 3 minutes (a written length that is no
    round number of seconds ends too)."""
    script = REPO_ROOT / "examples" / "episode_zh.fountain"
    profile = cost_report.profile_for(cost_report.PROFILES["standard"], "9:16", GPU)
    written = cost_report.repeat_episode(load_episode(script), 180.0)
    naive = make_plan(written, profile, calibration=calibration, prices=prices, script_sha256="0" * 64)
    assert naive.duration_s > 185.0  # the voices lengthen it
    assert cost_report.repeat_episode(load_episode(script), 160.041666).duration_s == pytest.approx(160.04)
    fitted = cost_report.planned_episode(script, 180.0, profile, calibration, prices, "0" * 64)
    plan = make_plan(fitted, profile, calibration=calibration, prices=prices, script_sha256="0" * 64)
    assert abs(plan.duration_s - 180.0) < 2.0 and fitted.duration_s < 170.0


@pytest.mark.parametrize("name", ["naive", "standard"])
def test_example_gpu_profiles_load_and_plan(name, calibration, prices, minute_episode):
    profile = cost_report.profile_for(cost_report.PROFILES[name], "9:16", GPU)
    assert profile.backend == "diffusers" and profile.size == (1080, 1920)
    plan = make_plan(minute_episode, profile, calibration=calibration, prices=prices, script_sha256="0" * 64)
    assert plan.estimated_cost_yuan > 0
    assert stage_rows(profile, calibration)["keyframes"].source.startswith("published")


def test_each_figure_is_seconds_from_its_row_times_the_price(calibration, prices, minute_episode):
    profile = cost_report.profile_for(cost_report.PROFILES["standard"], "16:9", GPU)
    plan = make_plan(minute_episode, profile, calibration=calibration, prices=prices, script_sha256="0" * 64)
    rows = stage_rows(profile, calibration)
    shot = next(s for s in plan.shots if len(s.keyframes) > 1)
    w, h = plan.width, plan.height
    gen = profile.settings_for("keyframes").gen_short_side
    gen_mpx = gen * gen * max(w, h) / min(w, h) / 1e6
    # Keyframes: the published GPU row's seconds × the A100 price row.
    kf = rows["keyframes"]
    assert kf.device == f"gpu:{GPU}"
    seconds = kf.overhead_s + len(shot.keyframes) * gen_mpx * kf.seconds_per_unit_mpx
    assert shot.estimate_seconds["keyframes"] == pytest.approx(seconds, abs=1e-4)
    per_hour = prices.row(kf.device).price * 7.10
    assert shot.estimate_yuan["keyframes"] == pytest.approx(shot.estimate_seconds["keyframes"] * per_hour / 3600)
    # In-betweens: the measured CPU row at 1080p × the CPU price row.
    ib = rows["inbetween"]
    seconds = ib.overhead_s + (len(shot.drawings) - len(shot.keyframes)) * (w * h / 1e6) * ib.seconds_per_unit_mpx
    assert shot.estimate_seconds["inbetween"] == pytest.approx(seconds, abs=1e-4)
    assert shot.estimate_yuan["inbetween"] == pytest.approx(seconds * prices.yuan_per_hour("cpu") / 3600, rel=1e-4)
    # The report's trace recomputes every stage from its rows and sums to the plan's total.
    figures = cost_report.trace(plan, calibration, prices)
    assert sum(f.yuan for f in figures) == pytest.approx(plan.estimated_cost_yuan)
    assert {f.price.resource for f in figures} == {"cpu", f"gpu:{GPU}"}


def test_naive_costs_more_than_optimized_on_both_tiers(calibration, prices, minute_episode):
    for tier in ("on-demand", "spot"):
        est = {name: cost_report.estimate("t", minute_episode, name, cost_report.profile_for(path, "16:9", GPU),
                                          GPU, tier, calibration, prices, "0" * 64)
               for name, path in cost_report.PROFILES.items()}
        assert est["naive"].yuan > 20 * est["standard"].yuan
        assert est["naive"].keyframes == est["naive"].frames  # every frame generated
        assert all(f.price.tier == tier for e in est.values() for f in e.stages)


def test_gpu_types_need_rows_for_both_profiles(calibration):
    profiles = {n: cost_report.profile_for(p, "16:9", "none") for n, p in cost_report.PROFILES.items()}
    gpus = cost_report.gpu_types(calibration, profiles)
    assert GPU in gpus and "H200" in gpus  # H200: measured by experiments/calibrate_gpu.py
    # a GPU with a row for only one profile's (family, steps) is not priced: nothing is invented
    partial = calibration.model_copy(update={"rows": [
        r for r in calibration.rows if (r.backend, r.device) != ("diffusers:sdxl:s30", "gpu:H200")]})
    assert "H200" not in cost_report.gpu_types(partial, profiles)


def test_pareto_front_on_a_small_table():
    rows = [
        {"config": "a", "cost_yuan_per_min": 1.0, "audit_psnr_db": 20.0},
        {"config": "b", "cost_yuan_per_min": 2.0, "audit_psnr_db": 25.0},
        {"config": "c", "cost_yuan_per_min": 2.5, "audit_psnr_db": 24.0},  # dominated by b
        {"config": "d", "cost_yuan_per_min": 3.0, "audit_psnr_db": 30.0},
        {"config": "e", "cost_yuan_per_min": 1.0, "audit_psnr_db": 19.0},  # dominated by a (same cost)
        {"config": "f", "cost_yuan_per_min": 0.5, "audit_psnr_db": None},  # no in-betweens: not ranked
    ]
    assert [r["config"] for r in sweep_levers.pareto_front(rows)] == ["a", "b", "d"]


def test_sweep_points_every_in_betweener_at_the_given_weights_and_counts_the_routes():
    configs = {value: sweep_levers.with_weights(o, "/w.pkl") for lever, value, o in sweep_levers.CONFIGS
               if lever == "interpolation"}
    assert configs["rife"]["rife"]["weights"] == configs["adaptive"]["adaptive"]["weights"] == "/w.pkl"
    assert configs["rife-one"]["rife"] == {"weights": "/w.pkl", "passes": "one"}
    assert configs["adaptive-flow-first"]["adaptive"]["threshold"] == 0.5 and "rife" not in configs["crossfade"]
    routes = {"a": {"route_flow": 3, "route_rife": 1, "route_fallback": 0},
              "b": {"route_flow": 0, "route_rife": 2, "route_fallback": 2}, "c": {"audit_psnr_db": 30.0}}
    assert sweep_levers.rife_share(routes) == 3 / 8
    assert sweep_levers.rife_share({"c": {"audit_psnr_db": 30.0}}) is None


def test_sweep_sub_episode_and_profiles_plan(calibration, prices):
    episode = sweep_levers.sub_episode(load_episode(REPO_ROOT / "examples" / "episode_en.fountain"), 20.0)
    assert 20.0 <= episode.duration_s < 30.0
    for lever, value, overrides in sweep_levers.CONFIGS:
        profile = resolve_profile(sweep_levers.BASE, overrides)
        plan = make_plan(episode, profile, calibration=sweep_levers.with_placeholders(calibration, profile),
                         prices=prices, script_sha256="0" * 64)
        assert plan.total_frames > 0, (lever, value)


def test_billed_view_traces_each_item_to_a_row_and_a_price(calibration, prices, minute_episode):
    e = cost_report.estimate("t", minute_episode, "standard", cost_report.profile_for(cost_report.PROFILES["standard"],
                                                                                      "9:16", "H200"),
                             "H200", "on-demand", calibration, prices, "0" * 64)
    b = cost_report.billed(e, prices)
    items = {f.item: f for f in b.figures}
    assert list(items) == ["busy (attributed)", "model_load", "warmup", "text_encoding", "idle", "cluster_start"]
    assert items["busy (attributed)"].yuan == e.yuan and items["busy (attributed)"].row is None
    per_s = prices.yuan_per_hour("gpu:H200") / 3600
    for name in ("model_load", "warmup", "text_encoding", "idle", "cluster_start"):
        f = items[name]
        assert f.row is not None and f.row.provenance in ("ASSUMPTION", "PUBLISHED") and f.row.source
        assert f.price.resource == "gpu:H200" and f.yuan == pytest.approx(f.seconds * per_s)
    # Text encoding: one prompt per image the model draws (keyframes, audit frames, plates, sheets).
    assert items["text_encoding"].quantity == e.prompts > e.keyframes
    assert items["text_encoding"].seconds == pytest.approx(e.prompts * cost_report.billed_row(
        "text_encoding", "sdxl", "H200").value)
    # Idle at the declared busy fraction: busy / (busy + idle) of the GPU is that fraction.
    gpu_busy = sum(s.seconds * s.units for s in e.stages if s.price.resource == "gpu:H200") + items["text_encoding"].seconds
    fraction = cost_report.billed_row("gpu_busy_fraction", "sdxl", "H200").value
    assert gpu_busy / (gpu_busy + items["idle"].seconds) == pytest.approx(fraction)
    # Billed: the items' sum; retakes repeat per-shot work only; billed ≥ attributed.
    assert b.one_pass_yuan == pytest.approx(sum(f.yuan for f in b.figures))
    once = items["model_load"].yuan + items["warmup"].yuan + items["cluster_start"].yuan
    assert b.yuan == pytest.approx(1.5 * (b.one_pass_yuan - once) + once)
    assert b.yuan > b.attributed_yuan == pytest.approx(1.5 * e.yuan) and 0 < b.utilization < 1
    # A series night sharing one node boot over 60 episodes bills less per episode; nothing else moves.
    night = cost_report.billed(e, prices, episodes_per_start=60)
    assert night.yuan == pytest.approx(b.yuan - items["cluster_start"].yuan * (1 - 1 / 60))


def test_billed_rows_prefer_the_gpus_own_figure_and_refuse_a_missing_one():
    assert cost_report.billed_row("text_encoding", "sdxl", "H100").provenance == "PUBLISHED"
    assert cost_report.billed_row("text_encoding", "sdxl", "H200").gpu == "*"  # no H200 figure: the assumption
    with pytest.raises(cost_report.ProfileError, match="no billed-view row for model_load of qwen-image"):
        cost_report.billed_row("model_load", "qwen-image", "H200")
    with pytest.raises(cost_report.ProfileError, match="each must be ≥ 1"):
        cost_report.billed(None, None, retake=0.5)


def test_report_headline_is_billed_per_minute_with_attributed_beside(calibration, prices):
    estimates, skipped = cost_report.build(calibration, prices)
    text = cost_report.render_markdown(estimates, skipped, calibration, prices)
    head = text.split("## Headline")[1].split("###")[0]
    assert "retake factor 1.5" in head and "No GPU machine was available" in head
    assert "| H200 | on-demand | standard |" in head and "attributed ¥/min" in head
    assert "## Billed trace" in text and "`node_boot,*,*`" in text


def test_the_in_betweening_sets_keep_their_parts_apart():
    """The split of experiments/interp_sets.py that the adaptive rule's honesty rests on: no frame of a tune
    triplet is in a held-out one, no fresh triplet is a report triplet, no unseen triplet is one of the report
    or fresh triplets that were looked at (those of the default counts, whatever this run's), no final triplet
    is one of any earlier part's, Sintel is never tuned on, and the middle of every triplet is a real frame that
    differs from both neighbours."""
    items = interp_sets.triplets(per=2, tune_per=2, fresh_per=3, unseen_per=3, final_per=3)
    parts = {p: [t for t in items if t.part == p] for p in interp_sets.PARTS}
    assert all(parts.values()) and {t.step for t in items} == set(interp_sets.STEPS)

    def frames(t) -> set[tuple[str, int]]:
        if t.set == "sintel":
            return {(t.name.split("/")[0], -1)}  # its own folders, never tuned on
        c = int(t.name.split("/")[1].split("k")[0])
        return {(t.set, c + d) for d in (-t.step, 0, t.step)}

    tuned = set().union(*(frames(t) for t in parts["tune"]))
    held = parts["report"] + parts["fresh"] + parts["unseen"] + parts["final"]
    assert not tuned & set().union(*(frames(t) for t in held))
    assert not {t.name for t in parts["fresh"]} & {t.name for t in parts["report"]}
    assert {t.set for t in parts["tune"]} == {"bbb", "pigs_gif"} and "sintel" not in {t.set for t in parts["fresh"]}
    assert all(not np.array_equal(t.mid, t.a) and not np.array_equal(t.mid, t.b) for t in items)
    assert all(len(t.between) == len(t.times) == 2 * t.step - 1 and t.between[t.step - 1] is t.mid for t in items)
    assert [t.name for t in interp_sets.triplets(per=2, tune_per=2, fresh_per=0) if t.part == "fresh"] == []
    looked_at = {t.name for t in interp_sets.triplets(per=6, tune_per=12, fresh_per=12, unseen_per=0)
                 if t.part in ("report", "fresh")}
    assert not {t.name for t in parts["unseen"]} & (looked_at | {t.name for t in parts["report"] + parts["fresh"]})
    assert {t.set for t in parts["unseen"]} == {"bbb", "chaplin"}
    assert {t.step for t in parts["unseen"]} == set(interp_sets.STEPS)
    assert all(t.part in ("unseen", "final") for t in items if t.set == "chaplin")  # never tuned on
    seen = {t.name for t in interp_sets.triplets(per=6, tune_per=12, fresh_per=12, unseen_per=12, final_per=0)}
    assert not {t.name for t in parts["final"]} & (seen | {t.name for t in items if t.part != "final"})
    assert {t.set for t in parts["final"]} == {"bbb", "chaplin"} and {t.step for t in parts["final"]} == set(
        interp_sets.STEPS)


def test_the_bench_checks_each_choice_only_on_the_parts_it_did_not_choose_on():
    """Measured rows stand-in: the tune part has only large motion the flow wins; report and unseen have subtle
    motion where RIFE beats the flow by 1 dB and its mix with the flow beats RIFE. The tune protocol finds nothing
    to route and misses on both; the looked-at protocol (which sees report) routes the subtle pairs through the
    cheap one-pass route and is checked on unseen alone, where it meets the target."""
    from types import SimpleNamespace

    from stages.inbetween import PairConfidence

    def row(part: str, subtle: bool) -> dict:
        flow, rife = (40.0, 41.0) if subtle else (40.0, 39.0)
        r = {"t": SimpleNamespace(part=part, set="bbb", step=1), "conf_s": 0.0,
             "conf": PairConfidence(inconsistent=0.05, motion=0.001 if subtle else 0.05, spread=0.1, residual=1.0,
                                    unaligned=10.0),
             "flow": (flow, 0.9, 0.01), "rife": (rife, 0.9, 1.0), "crossfade": (30.0, 0.8, 0.001)}
        for w in interp_bench.SWEEP_MIX:
            mixed = (41.5 if subtle else 39.5) if w < 1 else rife
            r[f"mix{w:g}"], r[f"one{w:g}"] = (mixed, 0.9, 1.0), (mixed - 0.1 * (w == 1), 0.9, 0.2)
        return r

    res = [row("tune", False) for _ in range(4)] + [row(p, True) for p in ("report", "unseen") for _ in range(4)]
    metrics: dict[str, float] = {}
    lines = interp_bench.protocol_lines(res, SimpleNamespace(), metrics)
    assert metrics["protocol.tune.chosen_threshold"] == 0.0 and metrics["protocol.tune.chosen_subtle_motion"] == 0.0
    assert metrics["protocol.tune.report.target_met"] == metrics["protocol.tune.unseen.target_met"] == 0.0
    assert metrics["protocol.looked-at.chosen_one_pass"] == 1.0 and metrics["protocol.looked-at.unseen.target_met"] == 1.0
    assert not any(k.startswith(("protocol.looked-at.report", "protocol.looked-at.tune")) for k in metrics)
    start = [i for i, x in enumerate(lines) if x.startswith("  looked-at")][0]
    looked = [lines[start]] + [x for x in lines[start + 1:] if x.startswith("    ")][:1]
    assert lines[start + 2].startswith("  seen")  # its only held-out part here is unseen
    assert [x.split(":")[0].strip() for x in looked[1:]] == ["unseen"] and "target met" in looked[1]

