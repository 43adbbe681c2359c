"""Regenerate the golden files: ``.venv/bin/python tests/golden/regenerate.py``.

Run it only for an intended change of plans or drawings, after bumping the VERSION of the
stage whose output changed (content keys include it, so stored artifacts are not reused
across the change). Never edit the JSON by hand.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
GOLDEN = HERE / "shotlist_draft.json"


def snapshot() -> dict:
    """What must not change silently: the plan's structure and keys, and the previz pixels."""
    from pipeline.calibration import Calibration
    from pipeline.config import resolve_profile
    from pipeline.cost import PriceCatalog
    from pipeline.plan import make_plan
    from stages import storyboard
    from stages.script import load_episode

    profile = resolve_profile("draft", {"short_side": 72})
    plan = make_plan(load_episode(REPO / "examples" / "shotlist.yaml"), profile,
                     calibration=Calibration.load(REPO / "cluster" / "calibration.csv"),
                     prices=PriceCatalog.load(REPO / "cluster" / "prices.csv", usd_cny=7.1), script_sha256="0" * 64)
    entry = profile.entry("keyframes")
    drawer = entry.build(profile.settings_for("keyframes"), width=plan.width, height=plan.height)
    drawn = drawer([s.keyframe_request() for s in plan.shots])

    def sha(array) -> str:
        return hashlib.sha256(array.tobytes()).hexdigest()[:16]

    return {"size": [plan.width, plan.height], "total_frames": plan.total_frames,
            "subtitles": [[c.start_s, c.end_s, c.text] for c in plan.subtitles],
            "shots": [{"id": s.shot.id, "frames": s.frames, "drawings": s.drawings, "keyframes": s.keyframes,
                       "audit_frame": s.audit_frame, "keys": s.keys,
                       "keyframe_pixels": [sha(f.image) for f in kf.frames],
                       "panel_pixels": sha(storyboard.render_panel(s.scene, width=96, aspect=profile.aspect))}
                      for s, kf in zip(plan.shots, drawn)]}


if __name__ == "__main__":
    GOLDEN.write_text(json.dumps(snapshot(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {GOLDEN}")
