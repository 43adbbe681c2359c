"""The billed view (issue #10.6): what a cloud bills for a render, itemised — model load, warm-up,
the nodes' busy time, idle held resources, cluster start — with the attributed cost beside it.

The pure view is checked on hand-made rows; one tiny episode is rendered for real through the
diffusers backend (real diffusers classes, random weights, on the CPU) on a real local Ray
cluster, and its model actor's load is billed as a ``model_load`` row."""
from __future__ import annotations

import hashlib
import os

import imageio_ffmpeg
import pytest

from pipeline.cost import PriceCatalog, billed_view
from pipeline.models import LedgerRecord
from tests.conftest import REPO

PRICES = PriceCatalog.load(REPO / "cluster" / "prices.csv", usd_cny=7.1)


def row(stage: str, seconds: float, resource: str = "cpu", units: float = 1.0, shot: str | None = "s1",
        cached: bool = False) -> LedgerRecord:
    return PRICES.record(stage, shot, seconds, resource, units, cached=cached)


def test_billed_is_the_sum_of_its_parts_and_each_part_is_priced_from_its_resource():
    nodes = [row("storyboard", 2.0), row("keyframes", 6.0, "gpu:H200"), row("clip", 1.0, cached=True)]
    starts = [row("model_load", 5.0, "gpu:H200", shot=None), row("warmup", 1.5, "gpu:H200", shot=None)]
    view = billed_view(PRICES, records=nodes, startups=starts, wall_seconds=20.0, ray_init_seconds=3.0,
                       cluster={"CPU": 4, "GPU": 1}, gpu_type="H200")
    assert view.billed_yuan == sum(view.parts_yuan.values())
    assert view.attributed_yuan == pytest.approx(nodes[0].yuan + nodes[1].yuan, rel=1e-12)
    assert view.utilization == view.attributed_yuan / view.billed_yuan < 1.0
    gpu = next(i for i in view.items if i.resource == "gpu:H200")
    cpu = next(i for i in view.items if i.resource == "cpu")
    # GPU: held 20 s; 5 s load + 1.5 s warm-up + 6 s busy leave 7.5 s idle; Ray's 3 s start on top.
    assert (gpu.held_s, gpu.model_load_s, gpu.warmup_s, gpu.busy_s, gpu.idle_s) == (20.0, 5.0, 1.5, 6.0, 7.5)
    assert (cpu.held_s, cpu.busy_s, cpu.idle_s, cpu.cluster_start_s) == (80.0, 2.0, 78.0, 12.0)
    assert gpu.busy_fraction == pytest.approx(6.0 / 20.0)
    gpu_h, cpu_h = PRICES.yuan_per_hour("gpu:H200"), PRICES.yuan_per_hour("cpu")
    assert view.model_load_yuan == pytest.approx(5.0 * gpu_h / 3600)
    assert view.warmup_yuan == pytest.approx(1.5 * gpu_h / 3600)
    assert view.idle_yuan == pytest.approx((7.5 * gpu_h + 78.0 * cpu_h) / 3600)
    assert view.cluster_start_yuan == pytest.approx(3.0 * (gpu_h + 4 * cpu_h) / 3600)
    # The machines × (wall + start) is what was billed: every part together, nothing twice.
    assert view.billed_yuan == pytest.approx((20.0 + 3.0) * (gpu_h + 4 * cpu_h) / 3600)


def test_idle_is_never_negative_when_nodes_bill_more_than_the_cluster_held():
    # Ray runs fractional-CPU tasks side by side: 3 nodes × 1 core × 10 s on a 2-core cluster for 10 s.
    nodes = [row("clip", 10.0, shot=f"s{i}") for i in range(3)]
    view = billed_view(PRICES, records=nodes, startups=[], wall_seconds=10.0, ray_init_seconds=0.0,
                       cluster={"CPU": 2}, gpu_type=None)
    assert view.idle_yuan == 0.0 and view.items[0].idle_s == 0.0
    assert view.billed_yuan == view.attributed_yuan == sum(view.parts_yuan.values())
    assert view.utilization == 1.0


def test_a_startup_row_of_another_stage_is_refused():
    with pytest.raises(ValueError, match="startup row of stage 'keyframes'"):
        billed_view(PRICES, records=[], startups=[row("keyframes", 1.0)], wall_seconds=1.0, ray_init_seconds=0.0,
                    cluster={"CPU": 1}, gpu_type=None)


@pytest.mark.slow
def test_a_diffusers_render_bills_its_model_load_idle_and_start_beside_the_attributed(tmp_path):
    pytest.importorskip("torch", reason="the diffusers backend needs the gen extra (make test installs it)")
    import ray

    from pipeline import cli, dag
    from pipeline.render import render
    from pipeline.store import open_store

    plan, prices = tiny_plan(tmp_path)
    cores = (os.cpu_count() or 1) + 1  # not what a bare ray.init() would find: proves whose start it was
    try:  # this render starts the module's one local Ray cluster: that start is its to bill
        result = render(plan, store=open_store(tmp_path / "store"), prices=prices,
                        ffmpeg=imageio_ffmpeg.get_ffmpeg_exe(), cluster=dag.Cluster(num_cpus=cores))
    finally:
        ray.shutdown()
    assert result.stopped is None
    # 0. Ray was started by the render's Cluster (its options), before the model actor: its start is
    #    the cluster start, not part of the model load.
    assert result.cluster["CPU"] == cores
    # 1. The model actor's start is billed as rows of its own, on the actor's resources, no shot.
    loads = [r for r in result.startups if r.stage == "model_load"]
    assert len(loads) == plan.profile.settings_for("keyframes").actors
    assert all(r.seconds > 0 and r.yuan > 0 and r.shot is None and r.resource == "cpu" for r in loads)
    assert not any(r.stage == "model_load" for r in result.ledger.records)  # not attributed to any shot
    # 2. The billed view: its parts, exactly; at least the attributed; utilization between them.
    view = result.billed
    assert view.billed_yuan == sum(view.parts_yuan.values())
    assert view.model_load_yuan == sum(r.yuan for r in loads) > 0
    assert view.attributed_yuan == pytest.approx(result.ledger.total_yuan, rel=1e-12)
    assert view.billed_yuan >= view.attributed_yuan > 0
    assert view.utilization == view.attributed_yuan / view.billed_yuan
    assert view.ray_init_seconds == result.ray_init_seconds > 0
    cpu = next(i for i in view.items if i.resource == "cpu")
    assert cpu.units == cores and cpu.cluster_start_s == cores * result.ray_init_seconds
    assert view.cluster_start_yuan == pytest.approx(prices.cost(cpu.cluster_start_s, "cpu", 1.0), rel=1e-12)
    # 3. cost.json carries the same view, itemised, with the startup rows.
    metrics, cost = cli._money(plan, result, prices, None)
    assert cost["billed_yuan"] == view.billed_yuan == metrics["billed_yuan"]
    assert cost["billed"]["parts_yuan"] == view.parts_yuan
    assert [r["stage"] for r in cost["billed"]["startups"]] == [r.stage for r in result.startups]
    assert metrics["billed.model_load_yuan"] == view.model_load_yuan
    assert metrics["utilization"] == pytest.approx(view.utilization, rel=1e-12)


def tiny_plan(root):
    """The tiny diffusers episode of tests/test_render_diffusers.py, planned into ``root``."""
    from tests.test_render_diffusers import tiny_plan as plan_into

    return plan_into(root, PRICES, sha=b"tiny-billed"), PRICES
