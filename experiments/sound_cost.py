"""What the sound costs: the voice, the mix and the burned-in subtitles per finished minute, as a
ratio to the rest of the render, on the two example episodes; and their calibration rows.

Each sample renders through the real pipeline as ``anim render`` does (a fresh artifact store so
every node runs; local Ray): the voice nodes first, then the plan timed by the measured speech,
then the render. The ratios come from one ledger, side by side, so the machine's load (shared by
other work) affects both sides alike; seconds alone are not comparable across runs.

    .venv/bin/python experiments/sound_cost.py            # print the table
    .venv/bin/python experiments/sound_cost.py --write    # and write the voice/mix/subtitles rows
"""
from __future__ import annotations

import argparse
import hashlib
import tempfile
from pathlib import Path

import imageio_ffmpeg

from pipeline import tracking
from pipeline.calibrate import fit_rows
from pipeline.calibration import Calibration
from pipeline.config import resolve_profile, resolve_settings
from pipeline.cost import PriceCatalog, billed_yuan
from pipeline.dag import Cluster
from pipeline.plan import make_plan
from pipeline.render import music_bed, render, speak, stored_speech
from pipeline.store import open_store
from stages.script import load_episode

SAMPLES = [(Path("examples/episode_en.fountain"), "16:9"), (Path("examples/episode_zh.fountain"), "9:16")]
SOUND = ("voice", "mix", "subtitles")


def measure(script: Path, aspect: str, settings, cluster: Cluster):
    profile = resolve_profile("draft", {"aspect": aspect})
    calibration = Calibration.load(settings.calibration)
    prices = PriceCatalog.load(settings.prices, usd_cny=settings.usd_cny)
    episode = load_episode(script)
    sha = hashlib.sha256(script.read_bytes()).hexdigest()
    guess = make_plan(episode, profile, calibration=calibration, prices=prices, script_sha256=sha,
                      bed=music_bed(episode, profile))
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(tmp)
        spoken = speak(guess, store=store, prices=prices, ffmpeg=imageio_ffmpeg.get_ffmpeg_exe(), cluster=cluster)
        plan = make_plan(episode, profile, calibration=calibration, prices=prices, script_sha256=sha,
                         speech=stored_speech(guess, store), bed=guess.bed)
        result = render(plan, store=store, prices=prices, ffmpeg=imageio_ffmpeg.get_ffmpeg_exe(), cluster=cluster,
                        spoken=spoken)
    metrics = tracking.render_metrics(plan, result.ledger, wall_seconds=result.wall_seconds, quality=result.quality,
                                      billed_yuan=billed_yuan(prices, result.wall_seconds, result.cluster, None))
    run_id = tracking.log_render(tracking_uri=settings.tracking_uri, plan=plan, ledger=result.ledger, metrics=metrics,
                                 artifacts={}, tags={"purpose": "sound-cost", "cluster": "local"}, series="calibration",
                                 plan_json=True)
    return plan, result.ledger, run_id


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="write the voice, mix and subtitles rows into the table")
    args = ap.parse_args()
    tracking.mlflow_defaults()
    settings = resolve_settings()
    cluster = Cluster(settings.ray_address, settings.num_cpus)
    renders = [measure(script, aspect, settings, cluster) for script, aspect in SAMPLES]
    print(f"{'sample':<22} {'min':>5} {'voice s':>8} {'mix s':>7} {'subs s':>7} {'rest s':>8} "
          f"{'voice+mix/rest':>15} {'+subs/rest':>11} {'¥ ratio':>8}")
    for (script, aspect), (plan, ledger, _) in zip(SAMPLES, renders):
        rows = [r for r in ledger.records if not r.cached]
        sec = {s: sum(r.seconds * r.units for r in rows if r.stage == s) for s in SOUND}
        rest = sum(r.seconds * r.units for r in rows if r.stage not in SOUND)
        yuan_sound = sum(r.yuan for r in rows if r.stage in SOUND)
        yuan_rest = sum(r.yuan for r in rows if r.stage not in SOUND)
        print(f"{script.name + ' ' + aspect:<22} {plan.duration_s / 60:>5.2f} {sec['voice']:>8.2f} {sec['mix']:>7.2f} "
              f"{sec['subtitles']:>7.2f} {rest:>8.2f} {(sec['voice'] + sec['mix']) / rest:>15.3f} "
              f"{sum(sec.values()) / rest:>11.3f} {yuan_sound / yuan_rest:>8.3f}")
    fitted = [r for r in fit_rows(renders, origin="experiments/sound_cost.py episode_en@draft 16:9, "
                                                  "episode_zh@draft 9:16") if r.stage in SOUND]
    for r in fitted:
        print(f"{r.stage:>10} {r.backend:>22}: {r.overhead_s:.4f} s + {r.seconds_per_unit_mpx:.5f} s/{r.unit}")
    if args.write:
        table = Calibration.load(settings.calibration)
        table.write(fitted)
        print(f"wrote {len(fitted)} rows to {table.path}")
    cluster.shutdown()


if __name__ == "__main__":
    main()
