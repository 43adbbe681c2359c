"""MLflow as a live cockpit that cannot break a paid render: a real SQLite tracking store in
tmp_path, real processes racing on its first use or killed mid-run, the real CLI."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import pytest
from typer.testing import CliRunner

from .conftest import REPO

ZH = REPO / "examples" / "episode_zh.fountain"
TINY = """Title: Tiny Night
Series: tracking test

INT. CAFE - NIGHT

[[shot: wide, 1s]]
Aya waits by the window.

[[shot: close-up, 1s]]
She smiles.
"""


@pytest.fixture
def where(tmp_path) -> dict[str, Path | str]:
    """A tracking store, an artifact store and a config file of this test's own."""
    (tmp_path / "config.toml").write_text("", encoding="utf-8")  # so no /etc or ~ config file is read
    return {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "store": tmp_path / "store",
            "config": tmp_path / "config.toml", "root": tmp_path}


def cli_env(where, **extra: str) -> dict[str, str | None]:
    env = {"RAY_ADDRESS": None, "ANIM_CONFIG": None, "ANIM_DEBUG": None, "MLFLOW_TRACKING_URI": str(where["uri"]),
           "ANIM_STORE": str(where["store"]), "HOME": str(where["root"] / "home"),
           "XDG_DATA_HOME": str(where["root"] / "data"), "XDG_CACHE_HOME": str(where["root"] / "cache")}
    return env | extra


def anim(where, *args: str, **env: str):
    from pipeline.cli import app

    return CliRunner().invoke(app, ["--config", str(where["config"]), *args], env=cli_env(where, **env))


def runs_json(where, *args: str) -> list[dict]:
    done = anim(where, "runs", "--json", *args)
    assert done.exit_code == 0, done.output
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def plan():
    from pipeline.calibration import Calibration
    from pipeline.config import resolve_profile
    from pipeline.cost import PriceCatalog
    from pipeline.plan import make_plan
    from stages.script import load_episode

    return make_plan(load_episode(ZH), resolve_profile("draft", {"aspect": "9:16"}),
                     calibration=Calibration.load(REPO / "cluster" / "calibration.csv"),
                     prices=PriceCatalog.load(REPO / "cluster" / "prices.csv", usd_cny=7.1), script_sha256="0" * 64)


def ledger_of(plan, *, cached: set[str] = frozenset()):
    from pipeline.models import Ledger, LedgerRecord

    rows = [LedgerRecord(stage=stage, shot=s.shot.id, seconds=0.5, resource="cpu", units=1.0,
                         yuan=0.0 if s.shot.id in cached else 0.001 * (i + 1), cached=s.shot.id in cached)
            for i, s in enumerate(plan.shots) for stage in ("storyboard", "keyframes", "inbetween")]
    return Ledger(records=rows + [LedgerRecord(stage="assemble", shot=None, seconds=0.2, resource="cpu", units=1.0,
                                               yuan=0.0005)])


def child(code: str, *args: str) -> subprocess.Popen:
    """A Python process of this checkout running ``code`` (stdout piped, line by line)."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})


# --------------------------------------------------------------------------- the tracking store


def test_four_processes_creating_a_new_sqlite_store_at_once_all_succeed(where):
    go = where["root"] / "go"
    code = """
        import sys, time
        from pathlib import Path
        from pipeline import tracking
        uri, go = sys.argv[1], Path(sys.argv[2])
        while not go.exists():  # every process has imported MLflow before any touches the store
            time.sleep(0.01)
        client = tracking.client(uri)
        run = client.create_run(tracking.experiment(client, uri, "race"))
        client.set_terminated(run.info.run_id)
        print(run.info.run_id)
    """
    procs = [child(code, str(where["uri"]), str(go)) for _ in range(4)]
    time.sleep(3)
    go.touch()
    results = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err[-1500:] for _, err in results]
    created = {out.strip() for out, _ in results}
    # The file is whole afterwards: one experiment, the four runs, and it takes a fifth.
    client = mlflow.MlflowClient(str(where["uri"]))
    exp = client.get_experiment_by_name("race")
    assert {r.info.run_id for r in client.search_runs([exp.experiment_id])} == created and len(created) == 4
    assert client.create_run(exp.experiment_id).info.status == "RUNNING"


def test_sqlite_file_in_a_missing_folder_is_one_line_and_creates_nothing(where):
    missing = where["root"] / "no" / "such"
    uri = f"sqlite:///{missing / 'mlflow.db'}"
    done = anim(where, "runs", MLFLOW_TRACKING_URI=uri)
    assert done.exit_code == 2
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and str(missing) in lines[0] and "does not exist" in lines[0], done.stderr
    # A render stops there too, before Ray starts or anything is spent.
    script = where["root"] / "tiny.fountain"
    script.write_text(TINY, encoding="utf-8")
    done = anim(where, "render", str(script), "--out", str(where["root"] / "out"), "--no-progress",
                MLFLOW_TRACKING_URI=uri)
    assert done.exit_code == 2 and "does not exist" in done.stderr and "Traceback" not in done.output
    assert not (where["root"] / "no").exists() and not (where["root"] / "out").exists()


# --------------------------------------------------------------------------- the live run


@pytest.mark.parametrize("stopped, status", [(None, "FINISHED"), ("storyboard", "FINISHED"), ("budget", "KILLED"),
                                             ("approval", "KILLED")])
def test_a_live_run_opens_running_takes_shots_as_they_finish_and_ends_with_its_reason(where, plan, stopped, status):
    from pipeline import tracking
    from pipeline.schedule import NodeId

    uri = str(where["uri"])
    spool = tracking.Spool(where["store"])
    live = tracking.RenderRun(uri, plan, script=ZH, spool=spool, budget_yuan=0.5, tags={"cluster": "local"})
    live.start()
    client = mlflow.MlflowClient(uri)
    # 1. Open before any work: RUNNING, with its driver, the plan and the estimate.
    run = client.get_run(live.run_id)
    assert run.info.status == "RUNNING" and run.data.tags["status"] == "running"
    assert run.data.tags["driver_pid"] == str(os.getpid()) and run.data.tags["driver_host"] == socket.gethostname()
    assert run.data.tags["aspect"] == "9:16" and run.data.tags["script"] == "episode_zh.fountain"
    assert run.data.metrics["estimated_cost_yuan"] == pytest.approx(plan.estimated_cost_yuan)
    assert run.data.metrics["budget_yuan"] == 0.5 and run.data.params["profile.aspect"] == "9:16"
    assert "plan.json" in {a.path for a in client.list_artifacts(live.run_id)}
    # 2. Shots finish out of script order; each arrives with its cost at its place in the script.
    ledger = ledger_of(plan)
    order = list(reversed(plan.shots))
    for done, shot in enumerate(order, 1):
        for node in ("storyboard", "keyframes", "clip"):
            rows = [r for r in ledger.records if r.shot == shot.shot.id and r.stage == {"clip": "inbetween"}.get(node, node)]
            live.on_node(NodeId(node, shot.shot.id), rows)
        live.on_progress(done, len(plan.shots), sum(r.yuan for r in ledger.records
                                                    if r.shot in {s.shot.id for s in order[:done]}))
    # 3. The end: status and reason, the ledger, the chart; nothing left in the spool.
    cost = {"total_yuan": ledger.total_yuan, "episode_spent_yuan": 0.25, "budget_yuan": 0.5}
    out = live.finish(live.record(ledger=ledger, metrics={"cost_yuan": ledger.total_yuan}, stopped=stopped,
                                  documents={"cost.json": cost}))
    assert out.run_id == live.run_id and out.error is None and out.pending is None and spool.uids() == []
    run = client.get_run(live.run_id)
    assert run.info.status == status and run.data.tags.get("stopped") == stopped
    assert run.data.tags["status"] == (stopped or "complete")
    history = client.get_metric_history(live.run_id, "shot_cost_yuan")
    index = {s.shot.id: i for i, s in enumerate(plan.shots)}
    expect = {index[s.shot.id]: sum(r.yuan for r in ledger.records if r.shot == s.shot.id) for s in plan.shots}
    assert {m.step: m.value for m in history} == pytest.approx(expect) and len(history) == len(plan.shots)
    assert max(m.value for m in client.get_metric_history(live.run_id, "shots_done")) == len(plan.shots)
    assert run.data.metrics["episode_spent_yuan"] == 0.25
    assert {"ledger.json", "cost_chart.png", "plan.json", "cost.json"} <= {a.path for a in client.list_artifacts(live.run_id)}
    # 4. `anim runs` shows script, aspect, status with its reason, and spent so far / budget.
    row = next(r for r in runs_json(where) if r["run_id"] == live.run_id)
    assert (row["script"], row["aspect"], row["mlflow_status"], row["stopped"]) == ("episode_zh.fountain", "9:16",
                                                                                    status, stopped)
    assert row["status"] == (f"{status} ({stopped})" if stopped else status)
    assert (row["episode_spent_yuan"], row["budget_yuan"]) == (0.25, 0.5)


def test_a_run_opened_in_the_background_keeps_what_arrived_before_it_was_open(where, plan):
    """``start(background=True)`` (what ``anim render`` does): the render goes on while MLflow starts;
    progress reported before the run exists is logged once it does, and the run is RUNNING until the end."""
    from pipeline import tracking

    uri = str(where["uri"])
    live = tracking.RenderRun(uri, plan, spool=tracking.Spool(where["store"]))
    live.start(background=True)
    for done in range(1, len(plan.shots) + 1):  # at once: the run is very likely not open yet
        live.on_progress(done, len(plan.shots), 0.001 * done)
    client = mlflow.MlflowClient(uri)

    def opened() -> bool:  # the run exists and its plan is logged (the opening's last step)
        return live.run_id is not None and "plan.json" in {a.path for a in client.list_artifacts(live.run_id)}

    deadline = time.monotonic() + 120
    while not opened() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert opened() and client.get_run(live.run_id).info.status == "RUNNING"
    ledger = ledger_of(plan)
    out = live.finish(live.record(ledger=ledger, metrics={"cost_yuan": ledger.total_yuan}, stopped=None))
    assert out.run_id == live.run_id and out.error is None
    steps = sorted(m.step for m in client.get_metric_history(live.run_id, "shots_done"))
    assert steps[:len(plan.shots)] == list(range(1, len(plan.shots) + 1))
    assert client.get_run(live.run_id).info.status == "FINISHED"


def test_a_render_that_fails_ends_its_run_failed_with_the_error(where, plan):
    from pipeline import tracking

    live = tracking.RenderRun(str(where["uri"]), plan)
    live.start()
    live.abort("error", "clip[sc01-sh01]: ffmpeg exited with 1")
    run = mlflow.MlflowClient(str(where["uri"])).get_run(live.run_id)
    assert run.info.status == "FAILED" and run.data.tags["stopped"] == "error"
    assert run.data.tags["error"] == "clip[sc01-sh01]: ffmpeg exited with 1" and run.data.tags["status"] == "failed"


# --------------------------------------------------------------------------- drivers that die


OPEN_AND_WAIT = """
    import sys, time
    from pathlib import Path
    from pipeline import tracking
    from pipeline.calibration import Calibration
    from pipeline.config import resolve_profile
    from pipeline.cost import PriceCatalog
    from pipeline.plan import make_plan
    from stages.script import load_episode
    uri, store, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    plan = make_plan(load_episode(Path("examples/episode_zh.fountain")), resolve_profile("draft"),
                     calibration=Calibration.load(Path("cluster/calibration.csv")),
                     prices=PriceCatalog.load(Path("cluster/prices.csv"), usd_cny=7.1), script_sha256="0" * 64)
    spool = tracking.Spool(store)
    live = tracking.RenderRun(uri, plan, spool=spool)
    live.start()
    if mode == "record":  # the render is over and its record is in the spool; MLflow not told yet
        from pipeline.models import Ledger, LedgerRecord
        ledger = Ledger(records=[LedgerRecord(stage="keyframes", shot=s.shot.id, seconds=1.0, resource="cpu",
                                              units=1.0, yuan=0.002) for s in plan.shots])
        spool.put(live.record(ledger=ledger, metrics={"cost_yuan": ledger.total_yuan}, stopped=None,
                              documents={"cost.json": {"total_yuan": ledger.total_yuan}}))
    print(live.run_id, flush=True)
    time.sleep(600)
"""


def killed_driver(where, mode: str) -> str:
    """The run id of a driver that opened its run (and, with mode 'record', spooled its record) and was then killed."""
    proc = child(OPEN_AND_WAIT, str(where["uri"]), str(where["store"]), mode)
    run_id = proc.stdout.readline().strip()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert run_id, proc.stderr.read()[-2000:]
    return run_id


def test_a_run_whose_driver_was_killed_is_closed_as_killed_by_runs_and_by_the_next_render(where, plan):
    from pipeline import tracking

    client = mlflow.MlflowClient(str(where["uri"]))
    first = killed_driver(where, "wait")
    assert client.get_run(first).info.status == "RUNNING"
    alive = tracking.RenderRun(str(where["uri"]), plan, series="another series")  # this process: alive
    alive.start()
    # 1. `anim runs` closes the dead driver's run, and only that one.
    rows = {r["run_id"]: r for r in runs_json(where)}
    assert (rows[first]["mlflow_status"], rows[first]["stopped"]) == ("KILLED", "driver_gone")
    assert rows[alive.run_id]["mlflow_status"] == "RUNNING" and client.get_run(first).data.tags["status"] == "killed"
    # 2. The next render of the same series closes one too, when it opens its own run.
    second = killed_driver(where, "wait")
    following = tracking.RenderRun(str(where["uri"]), plan)
    following.start()
    assert following.closed == [second] and client.get_run(second).info.status == "KILLED"
    for live in (alive, following):
        live.abort("interrupted")
    assert client.get_run(alive.run_id).info.status == "KILLED"


def test_a_render_killed_while_logging_is_completed_from_its_spooled_record(where):
    from pipeline import tracking

    run_id = killed_driver(where, "record")
    spool = tracking.Spool(where["store"])
    assert len(spool.uids()) == 1
    rows = {r["run_id"]: r for r in runs_json(where)}
    # The very run the driver opened, finished from the record, not closed as abandoned.
    assert rows[run_id]["mlflow_status"] == "FINISHED" and rows[run_id]["stopped"] is None
    client = mlflow.MlflowClient(str(where["uri"]))
    run = client.get_run(run_id)
    assert run.data.metrics["cost_yuan"] == pytest.approx(0.002 * run.data.metrics["shots"])
    assert {"ledger.json", "cost.json", "plan.json", "cost_chart.png"} <= {a.path for a in client.list_artifacts(run_id)}
    assert spool.uids() == [] and len(rows) == 1


# --------------------------------------------------------------------------- an unreachable server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_an_unreachable_server_costs_the_render_nothing_and_the_run_is_logged_later(where):
    script = where["root"] / "tiny.fountain"
    script.write_text(TINY, encoding="utf-8")
    env = {k: v for k, v in {**os.environ, **cli_env(where)}.items() if v is not None}
    server = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    first, second = where["root"] / "out1", where["root"] / "out2"

    def render(out: Path, uri: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipeline", "--config", str(where["config"]), "render",
                               str(script), "--out", str(out), "--no-progress"], cwd=REPO, capture_output=True,
                              text=True, timeout=600, env={**env, "MLFLOW_TRACKING_URI": uri})

    # 1. The render finishes and publishes; one line says MLflow did not take it and where it waits.
    done = render(first, server)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (first / "episode.mp4").stat().st_size > 0 and "Traceback" not in done.stderr
    said = [ln for ln in done.stderr.splitlines() if "MLflow" in ln]
    assert len(said) == 1 and server in said[0] and "anim runs" in said[0], done.stderr
    assert "MLflow run:" not in done.stdout
    pending = list((where["store"] / "tracking-pending").glob("*.json"))
    assert len(pending) == 1
    # 2. The next render, on a tracking store that answers, logs it beside its own live run.
    again = render(second, str(where["uri"]))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "logged 1 earlier render(s)" in again.stderr
    live_id = again.stdout.split("MLflow run:")[1].split()[0]
    assert list((where["store"] / "tracking-pending").glob("*.json")) == []
    client = mlflow.MlflowClient(str(where["uri"]))
    exp = client.get_experiment_by_name("tracking test")
    found = {r.info.run_id: r for r in client.search_runs([exp.experiment_id])}
    assert len(found) == 2
    late = next(r for i, r in found.items() if i != live_id)
    cost = json.loads((first / "cost.json").read_text())
    assert late.info.status == "FINISHED" and late.data.tags["logged_late_from"] == server
    assert late.data.metrics["cost_yuan"] == pytest.approx(cost["total_yuan"], rel=1e-9, abs=1e-12)
    assert {"episode.mp4", "ledger.json", "plan.json", "cost.json", "cost_chart.png"} <= {
        a.path for a in client.list_artifacts(late.info.run_id)}
    # The live run saw every shot as it finished.
    assert found[live_id].info.status == "FINISHED" and found[live_id].data.tags["script"] == "tiny.fountain"
    assert {"episode.mp4", "ledger.json", "plan.json", "cost_chart.png"} <= {
        a.path for a in client.list_artifacts(live_id)}
    assert max(m.value for m in client.get_metric_history(live_id, "shots_done")) == 2


# --------------------------------------------------------------------------- compare


def test_compare_marks_a_cached_shot_instead_of_minus_100_percent(where, plan):
    from pipeline import tracking

    uri = str(where["uri"])
    first, second = plan.shots[0].shot.id, plan.shots[1].shot.id
    a = tracking.log_render(tracking_uri=uri, plan=plan, ledger=ledger_of(plan), metrics={"cost_yuan": 1.0},
                            artifacts={}, tags={"status": "complete"})
    b = tracking.log_render(tracking_uri=uri, plan=plan, ledger=ledger_of(plan, cached={first}),
                            metrics={"cost_yuan": 0.5}, artifacts={}, tags={"status": "complete"})
    done = anim(where, "compare", a, b, "--json")
    assert done.exit_code == 0, done.output
    shots = json.loads(done.stdout)["shots"]
    assert shots[first]["b_cached"] and not shots[first]["a_cached"] and shots[first]["b"] == 0.0
    assert not shots[second]["b_cached"]
    table = anim(where, "compare", a[:8], b[:8])
    assert table.exit_code == 0, table.output
    row = next(ln for ln in table.stdout.splitlines() if first in ln)
    assert "cached" in row and "-100" not in row
