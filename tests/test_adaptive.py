"""Adaptive in-betweening on the real flow, the real RIFE 4.x weights and a real render.

The rule (``AdaptiveInterpolator.route``, thresholds chosen on the tune split of the bench): a pair goes to
RIFE where its motion is subtle (``motion < subtle_motion``) or its flow explains it poorly (``score <
threshold``); every other pair is *confident* and stays with the flow. On the tune data the flow beats RIFE
on large motion, so a large synthetic motion goes to RIFE only through the score (below a threshold that
asks for it), and a subtle motion goes there by default. Tested: routing is deterministic and a pure
function of the confidence; a confident pair never runs RIFE; a subtle-motion pair and (with a threshold
above its score) a large synthetic motion do, and get RIFE's output mixed with the flow's by ``rife_weight``
(RIFE's own at weight 1); the ledger and the quality record
agree on the routes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from pipeline import registry
from stages.inbetween import Crossfade, FlowInterpolator, PairConfidence, pair_confidence
from stages.inbetween_adaptive import AdaptiveInterpolator, AdaptiveSettings
from tests.conftest import FRAMES, REPO, SHARED_DATA, read_rgb

WEIGHTS = SHARED_DATA / "weights" / "rife" / "flownet.pkl"
needs_weights = pytest.mark.skipif(not WEIGHTS.is_file(), reason=f"RIFE weights absent: {WEIGHTS}")
# The rule these tests exercise: a setting that routes by the confidence (the shipped defaults send every
# coherent pair to RIFE, threshold 1.0; tested on their own below).
RULE = {"threshold": 0.5, "subtle_motion": 0.002, "rife_weight": 0.5, "fallback": "crossfade", "fallback_above": 0.4,
        "subtle_alone": False}
THRESHOLD, SUBTLE, RIFE_WEIGHT, FALLBACK_ABOVE = (RULE[k] for k in ("threshold", "subtle_motion", "rife_weight",
                                                                     "fallback_above"))
MIXED_THRESHOLD = 0.2
LARGE_MOTION_THRESHOLD = 0.05  # above big_motion()'s score (0.016): the score route takes it


@pytest.fixture(scope="module")
def rife():
    if not WEIGHTS.is_file():
        pytest.skip(f"RIFE weights absent: {WEIGHTS}")
    from stages.rife import RifeInterpolator

    return RifeInterpolator(weights=WEIGHTS, threads=2)


def forward_passes(rife) -> list[int]:
    """A counter of the real net's forward passes (a torch forward hook on this instance's net)."""
    calls: list[int] = []
    rife.net.register_forward_hook(lambda *_: calls.append(1))
    return calls


def adaptive(rife, defaults: dict = RULE, **kw) -> AdaptiveInterpolator:
    """The adaptive in-betweener with ``RULE`` (or ``defaults``), but for ``kw``."""
    return AdaptiveInterpolator(flow=FlowInterpolator(), rife=rife, crossfade=Crossfade(), lazy=False,
                                **{**defaults, **kw})


def shipped() -> dict:
    """The profile's defaults (``AdaptiveSettings``)."""
    return {k: AdaptiveSettings.model_fields[k].default for k in RULE}


def slow_pan() -> tuple[np.ndarray, np.ndarray]:
    """Real consecutive frames of a slow pan (Big Buck Bunny 119 → 121), at 320×180."""
    a, _, b = (read_rgb(p) for p in sorted((FRAMES / "bbb" / "triplet_f0120").glob("*.png")))
    return tuple(cv2.resize(x, (320, 180), interpolation=cv2.INTER_AREA) for x in (a, b))


def subtle_motion() -> tuple[np.ndarray, np.ndarray]:
    """The slow pan's first frame and itself moved by a third of a pixel, its light 1% brighter (320×180)."""
    a, _ = slow_pan()
    m = np.float32([[1, 0, 1 / 3], [0, 1, 1 / 6]])
    b = cv2.warpAffine(a, m, (a.shape[1], a.shape[0]), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    return a, cv2.convertScaleAbs(b, alpha=1.01)


def big_pan() -> tuple[np.ndarray, np.ndarray]:
    """The slow pan's first frame and itself moved 12 px left and 4 px up: large, coherent motion (320×180)."""
    a, _ = slow_pan()
    m = np.float32([[1, 0, -12], [0, 1, -4]])
    return a, cv2.warpAffine(a, m, (a.shape[1], a.shape[0]), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def big_motion() -> tuple[np.ndarray, np.ndarray]:
    """A textured disc crossing 40% of a textured frame (160×96) while the background pans back."""
    rng = np.random.default_rng(7)
    bg = cv2.GaussianBlur(rng.integers(0, 256, (96, 400, 3), dtype=np.uint8), (0, 0), 2.0)
    fg = cv2.GaussianBlur(rng.integers(0, 256, (96, 160, 3), dtype=np.uint8), (0, 0), 1.0)
    out = []
    for x_bg, x_disc in ((120, 30), (100, 94)):
        img = bg[:, x_bg:x_bg + 160].copy()
        mask = np.zeros((96, 160), np.uint8)
        cv2.circle(mask, (x_disc + 18, 48), 22, 255, -1)
        img[mask > 0] = np.roll(fg, x_disc, 1)[mask > 0]
        out.append(img)
    return out[0], out[1]


def test_the_confidence_separates_a_slow_pan_a_subtle_motion_and_large_motion():
    fi = FlowInterpolator()
    calm, subtle, wild = (pair_confidence(a, b, *fi.flows(a, b)) for a, b in (slow_pan(), subtle_motion(), big_motion()))
    assert calm.score >= THRESHOLD and calm.motion >= SUBTLE and calm.inconsistent <= FALLBACK_ABOVE  # the flow's
    assert subtle.motion < SUBTLE <= calm.motion  # subtle: RIFE's
    assert wild.inconsistent > FALLBACK_ABOVE and wild.motion >= SUBTLE > 0  # incoherent: the fallback's by default
    assert wild.score < LARGE_MOTION_THRESHOLD <= calm.score  # ... RIFE's without one, below a threshold above its score
    assert wild.motion > 3 * calm.motion and wild.inconsistent > 10 * calm.inconsistent
    assert wild.residual / wild.unaligned > 3 * calm.residual / calm.unaligned  # the flow explains little of it
    assert 0.0 < wild.score < calm.score <= 1.0


@needs_weights
def test_a_confident_pair_never_runs_rife_and_matches_the_flow_exactly(rife):
    calls = forward_passes(rife)
    a, b = slow_pan()
    ad = adaptive(rife)
    out = ad(a, b, [0.25, 0.5, 0.75])
    assert calls == [] and ad.routes == {"flow": 1, "rife": 0, "fallback": 0}
    assert ad.seconds["rife"] == 0.0 < ad.seconds["flow"]
    for got, want in zip(out, FlowInterpolator()(a, b, [0.25, 0.5, 0.75])):
        assert np.array_equal(got, want)


@needs_weights
@pytest.mark.parametrize("pair, kw", [(subtle_motion, {}),
                                     (big_motion, {"threshold": LARGE_MOTION_THRESHOLD, "fallback": "none"})],
                         ids=["subtle motion, default rule", "large motion, score below the threshold"])
def test_subtle_motion_and_large_motion_below_the_threshold_go_to_rife_and_get_rifes_output(rife, pair, kw):
    """RIFE's in-between mixed with the flow's by ``rife_weight`` (RIFE's alone at weight 1)."""
    a, b = pair()
    want_rife, want_flow = rife(a, b, [0.5])[0], FlowInterpolator()(a, b, [0.5])[0]
    calls = forward_passes(rife)
    for weight, want in ((RIFE_WEIGHT, cv2.addWeighted(want_rife, RIFE_WEIGHT, want_flow, 1 - RIFE_WEIGHT, 0.0)),
                         (1.0, want_rife)):
        ad = adaptive(rife, rife_weight=weight, **kw)
        out = ad(a, b, [0.5])
        assert ad.routes == {"flow": 0, "rife": 1, "fallback": 0}
        assert ad.seconds["rife"] > 0 and ad.seconds["flow"] > 0  # the flow and its judgement were paid too
        assert np.array_equal(out[0], want)
    assert len(calls) == 2 and 0 < RIFE_WEIGHT < 1
    assert not np.array_equal(want_rife, want_flow)  # the mix is neither


@needs_weights
def test_the_defaults_send_every_coherent_pair_to_rife_mixed_a_still_one_alone_and_crossfade_incoherent_motion(rife):
    """The shipped choice (threshold 1.0, subtle_motion 0.001 alone, weight 0.5, crossfade above 0.4)."""
    d = shipped()
    assert d["threshold"] == 1.0 and d["subtle_alone"] and d["fallback"] == "crossfade"
    ad = adaptive(rife, defaults=d)
    a, b = slow_pan()  # confident under RULE, yet mixed with RIFE by default
    want = cv2.addWeighted(rife(a, b, [0.5])[0], d["rife_weight"], FlowInterpolator()(a, b, [0.5])[0],
                           1 - d["rife_weight"], 0.0)
    assert np.array_equal(ad(a, b, [0.5])[0], want)
    a, _ = slow_pan()  # a tenth of a pixel: nearly still, RIFE alone
    b = cv2.warpAffine(a, np.float32([[1, 0, 0.1], [0, 1, 0]]), (a.shape[1], a.shape[0]), flags=cv2.INTER_LINEAR,
                       borderMode=cv2.BORDER_REFLECT)
    c = pair_confidence(a, b, *FlowInterpolator().flows(a, b))
    assert c.motion < d["subtle_motion"] and ad.weight(c) == 1.0
    assert np.array_equal(ad(a, b, [0.5])[0], rife(a, b, [0.5])[0])
    a, b = big_motion()
    assert np.array_equal(ad(a, b, [0.5])[0], Crossfade()(a, b, [0.5])[0])
    assert ad.routes == {"flow": 0, "rife": 2, "fallback": 1}


@needs_weights
def test_subtle_alone_gives_a_subtle_pair_rifes_own_in_between_and_still_mixes_a_low_score_one(rife):
    a, b = subtle_motion()
    ad = adaptive(rife, subtle_alone=True, rife_weight=0.5, threshold=LARGE_MOTION_THRESHOLD, fallback="none")
    assert np.array_equal(ad(a, b, [0.5])[0], rife(a, b, [0.5])[0])
    a, b = big_motion()  # sent to RIFE for its score, not its motion: mixed
    want = cv2.addWeighted(rife(a, b, [0.5])[0], 0.5, FlowInterpolator()(a, b, [0.5])[0], 0.5, 0.0)
    assert np.array_equal(ad(a, b, [0.5])[0], want)
    assert ad.routes == {"flow": 0, "rife": 2, "fallback": 0}
    entry = registry.get("inbetween", "adaptive")  # a profile field, in the content key
    s = entry.settings(weights=str(WEIGHTS), subtle_alone=True)
    assert entry.build(s, width=320, height=180).subtle_alone and entry.key_params(s)["subtle_alone"] is True


@needs_weights
def test_large_motion_the_flow_explains_stays_with_it_and_incoherent_motion_is_crossfaded_by_default(rife):
    """The sets' finding: the flow beats RIFE on large motion it explains, so by default it keeps it; where the
    flow is inconsistent on most pixels (no coherent motion) the default's fallback crossfades."""
    calls = forward_passes(rife)
    a, b = big_pan()
    fi = FlowInterpolator()
    c = pair_confidence(a, b, *fi.flows(a, b))
    assert c.motion > 5 * SUBTLE and c.score >= THRESHOLD and c.inconsistent <= FALLBACK_ABOVE
    ad = adaptive(rife)
    assert np.array_equal(ad(a, b, [0.5])[0], fi(a, b, [0.5])[0])
    a, b = big_motion()
    assert np.array_equal(ad(a, b, [0.5])[0], Crossfade()(a, b, [0.5])[0])
    assert ad.routes == {"flow": 1, "rife": 0, "fallback": 1} and calls == []


@needs_weights
def test_routing_is_deterministic_and_a_pure_function_of_the_score(rife):
    pairs = [slow_pan(), subtle_motion(), big_motion(), slow_pan()[::-1], subtle_motion()[::-1], big_motion()[::-1]]
    runs = []
    for _ in range(2):
        ad = adaptive(rife)
        outs = [ad(a, b, [0.5])[0] for a, b in pairs]
        runs.append((ad.scores, dict(ad.routes), outs))
    (s0, r0, o0), (s1, r1, o1) = runs
    assert s0 == s1 and r0 == r1 == {"flow": 2, "rife": 2, "fallback": 2}
    assert all(np.array_equal(x, y) for x, y in zip(o0, o1))
    # the route is a function of the confidence alone: with a fallback the inconsistent share against its
    # bound first, then RIFE where the motion is subtle or the score is below the threshold
    ad = adaptive(rife, fallback="crossfade", fallback_above=0.5, threshold=0.05, subtle_motion=0.0025)
    c = dict(inconsistent=0.1, motion=0.5, spread=0.5, residual=1.0, unaligned=10.0)  # score 0.81
    assert ad.route(PairConfidence(**c)) == "flow"
    assert ad.route(PairConfidence(**{**c, "residual": 9.8})) == "rife"  # score 0.018
    assert ad.route(PairConfidence(**{**c, "motion": 0.001})) == "rife"
    assert ad.route(PairConfidence(**{**c, "inconsistent": 0.6})) == "fallback"
    none = {"fallback": "none", "subtle_motion": 0.0025}
    assert adaptive(rife, threshold=0.0, **none).route(PairConfidence(**{**c, "inconsistent": 0.6})) == "flow"  # 0.36
    assert adaptive(rife, threshold=0.5, **none).route(PairConfidence(**{**c, "inconsistent": 0.6})) == "rife"
    assert adaptive(rife, subtle_motion=0.0).route(PairConfidence(**{**c, "motion": 0.0})) == "flow"  # score 0.81


@needs_weights
def test_the_fallback_takes_pairs_below_its_floor(rife):
    calls = forward_passes(rife)
    a, b = big_motion()
    for fallback, want in (("crossfade", Crossfade()(a, b, [0.25])[0]), ("hold", a)):
        ad = adaptive(rife, fallback=fallback, fallback_above=0.5)
        (out,) = ad(a, b, [0.25])
        assert ad.routes["fallback"] == 1 and np.array_equal(out, want)
    assert calls == []


def test_a_hold_is_copied_without_rife_and_bad_settings_are_refused():
    a, _ = slow_pan()
    ad = AdaptiveInterpolator(flow=FlowInterpolator(), rife=lambda: pytest.fail("RIFE built for a hold"),
                              crossfade=Crossfade(), threshold=1.0, subtle_motion=SUBTLE)
    assert all(np.array_equal(o, a) for o in ad(a, a.copy(), [0.5, 0.75]))
    assert ad.routes["flow"] == 1 and ad.scores == []
    with pytest.raises(ValueError, match="fallback"):
        AdaptiveInterpolator(flow=None, rife=None, crossfade=None, threshold=0.5, subtle_motion=0.0, fallback="blur")
    with pytest.raises(ValueError, match="threshold"):
        AdaptiveInterpolator(flow=None, rife=None, crossfade=None, threshold=1.5, subtle_motion=0.0)
    with pytest.raises(ValueError, match="subtle_motion"):
        AdaptiveInterpolator(flow=None, rife=None, crossfade=None, threshold=0.0, subtle_motion=-0.1)
    with pytest.raises(ValueError, match="rife_weight"):
        AdaptiveInterpolator(flow=None, rife=None, crossfade=None, threshold=0.0, subtle_motion=0.0, rife_weight=0.0)


def test_the_registry_entry_builds_rife_only_when_a_pair_needs_it():
    entry = registry.get("inbetween", "adaptive")
    s = entry.settings(weights=str(SHARED_DATA / "no-such-weights.pkl"), threshold=THRESHOLD, subtle_motion=SUBTLE)
    ad = entry.build(s, width=320, height=180)
    a, b = slow_pan()
    ad(a, b, [0.5])  # confident: RIFE's (missing) weights are never opened
    assert ad.routes["flow"] == 1 and ad._rife is None
    assert entry.resources(s).resource == "cpu"
    gpu = entry.settings(weights="w.pkl", device="cuda:1", num_gpus=0.5)
    assert entry.resources(gpu).resource == "gpu:H200" and entry.key_params(gpu)["device"] == "cuda"
    assert "num_gpus" not in entry.key_params(gpu)


@needs_weights
def test_the_registry_entry_gives_rife_the_profiles_passes():
    entry = registry.get("inbetween", "adaptive")
    for passes in ("per_time", "one"):
        s = entry.settings(weights=str(WEIGHTS), rife_passes=passes)
        assert entry.build(s, width=320, height=180).rife.passes == passes and entry.key_params(s)["rife_passes"] == passes
    with pytest.raises(ValidationError, match="rife_passes"):
        entry.settings(weights=str(WEIGHTS), rife_passes="twice")


@pytest.mark.slow
@needs_weights
def test_a_render_bills_each_route_and_its_quality_record_counts_them(tmp_path):
    """A tiny real render (CLI, local Ray, ffmpeg, MLflow on SQLite) with a threshold that sends some
    pairs to each method: cost.json's rows per method and the quality record's route counts agree."""
    script = tmp_path / "two_shots.yaml"
    script.write_text("""title: Adaptive Test
characters: [MEI, KAI]
scenes:
  - heading: EXT. STONE BRIDGE - NIGHT
    shots:
      - {duration: 2.0, camera: wide, characters: [KAI, MEI], action: Kai waves from the bridge., dialogue: []}
      - {duration: 2.0, camera: medium, characters: [MEI], action: Mei kneels and lights a lantern., dialogue: []}
""")
    profile = tmp_path / "adaptive.toml"
    profile.write_text(f"""name = "tiny_adaptive"
short_side = 64
fps = 24
animate_on = 2
keyframe_stride = 4
interpolation = "adaptive"
crf = 30
x264_preset = "veryfast"
storyboard_width = 128

[adaptive]
threshold = {MIXED_THRESHOLD}
subtle_motion = {SUBTLE}
fallback = "none"
weights = "{WEIGHTS}"
""")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "ANIM_STORE": str(tmp_path / "store"),
           "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "mlartifacts")}
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "pipeline", "render", str(script), "--profile", str(profile),
                           "--out", str(out), "--no-progress"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    cost = json.loads((out / "cost.json").read_text())
    plan = json.loads((out / "plan.json").read_text())
    rows = [r for r in cost["records"] if r["stage"] == "inbetween"]
    routes = {shot: {k[6:]: int(v) for k, v in q.items() if k.startswith("route_")} for shot, q in cost["quality"].items()}
    totals = {m: sum(r[m] for r in routes.values()) for m in ("flow", "rife", "fallback")}
    assert totals["flow"] > 0 and totals["rife"] > 0 and totals["fallback"] == 0  # the threshold mixes them
    for shot in plan["shots"]:
        sid, keys, drawings = shot["scene"]["shot"]["id"], shot["keyframes"], shot["drawings"]
        pairs = sum(1 for k0, k1 in zip(keys, keys[1:]) if any(k0 < d < k1 for d in drawings))
        assert sum(routes[sid].values()) == pairs, sid
        billed = {r["method"] for r in rows if r["shot"] == sid}
        assert ("rife" in billed) == (routes[sid]["rife"] > 0), sid
        assert billed == {None} if pairs == 0 else "flow" in billed and billed <= {"flow", "rife"}, sid
        assert all(r["seconds"] >= 0 and r["resource"] == "cpu" for r in rows if r["shot"] == sid)
    rife_yuan = sum(r["yuan"] for r in rows if r["method"] == "rife")
    assert rife_yuan > 0


@needs_weights
def test_the_clip_node_bills_one_row_per_method_used_and_the_rest_of_the_stream_to_the_first(rife, prices):
    from pipeline.ledger import Timing
    from pipeline.nodes import inbetween_timings
    from pipeline.registry import Resources

    ad = adaptive(rife)
    for a, b in (slow_pan(), subtle_motion()):
        ad(a, b, [0.5])
    total = sum(ad.seconds.values()) + 0.25  # the stream's own time: holds, repeats
    rows = inbetween_timings(ad, total, Resources())
    assert [r.method for r in rows] == ["flow", "rife"]
    assert rows[1].seconds == ad.seconds["rife"] and rows[0].seconds == pytest.approx(ad.seconds["flow"] + 0.25)
    assert sum(r.seconds for r in rows) == pytest.approx(total)
    priced = [prices.record(r.stage, "sh01", r.seconds, r.resource, r.units, method=r.method) for r in rows]
    assert [p.method for p in priced] == ["flow", "rife"] and all(p.yuan > 0 for p in priced)
    # a plain in-betweener, and an adaptive one that made no pair: one row, no method
    assert inbetween_timings(FlowInterpolator(), 1.0, Resources()) == [Timing("inbetween", 1.0)]
    assert inbetween_timings(adaptive(rife), 1.0, Resources()) == [Timing("inbetween", 1.0)]
