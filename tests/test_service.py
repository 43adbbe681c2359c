"""The render service on real components: a Ray head this module starts (free ports, token
auth) and stops itself, the service as its own ``anim serve`` process, a real SQLite job table,
real MLflow (a SQLite file), real ffmpeg. Scripts are tiny (1-s shots at draft).

Covered here: accounts and isolation (every route refuses without credentials, a producer cannot
see another's job or its files, upload names cannot place files), bad scripts refused with the
CLI's own line, the lifecycle to a downloaded episode with progress, events and logs, idempotent
resubmission, cancel, the approval gate, the queue policy and all-or-nothing batches, per-key
dedup of two jobs of one script, and (slow) a SIGKILLed service and a SIGKILLed driver.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from pipeline.service.client import ServiceClient, ServiceError
from pipeline.service.process import ServiceProcess, add_account, isolated_env

REPO = Path(__file__).resolve().parents[1]


def tiny_script(tag: str, shots: int = 2, seconds: float = 1.0, line: str | None = None) -> str:
    """A shot list of ``shots`` short shots; ``line``: Mei says it in the first (a voice node)."""
    lines = [f"title: 服务测试 {tag}", "characters: [MEI, KAI]", "scenes:", "  - heading: EXT. RIVERBANK - DUSK",
             "    location: RIVERBANK", "    time_of_day: DUSK", "    shots:"]
    for i in range(shots):
        who = "[MEI]" if i % 2 == 0 else "[KAI, MEI]"
        said = f", dialogue: [{{character: MEI, text: '{line}'}}]" if line and i == 0 else ""
        lines.append(f"      - {{duration: {seconds}, camera: medium, characters: {who}, "
                     f"action: 'Mei lights lantern {i} for {tag}.'{said}}}")
    return "\n".join(lines) + "\n"


@dataclass
class Stack:
    root: Path
    env: dict
    tokens: dict  # user -> API token
    endpoint: object
    service: ServiceProcess

    @property
    def url(self) -> str:
        return self.service.url

    def client(self, user: str = "alice") -> ServiceClient:
        return ServiceClient(self.url, self.tokens[user])

    def start(self) -> None:
        self.service.start()

    def kill(self) -> None:
        self.service.kill()

    def script(self, name: str, text: str) -> Path:
        path = self.root / name
        path.write_text(text, encoding="utf-8")
        return path

    def ray_jobs(self) -> list:
        return self.endpoint.client().list_jobs()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from pipeline.service.cluster import JobsEndpoint, local_endpoint, stop_local_head

    root = tmp_path_factory.mktemp("service")
    env = isolated_env(root, ANIM_SERVICE_MAX_RENDERS="2")
    # 1. The head, started by the test (the service finds it in its data dir and reuses it).
    endpoint = local_endpoint(root / "data", num_cpus=2)
    try:
        # 2. Accounts: one through the CLI, the others directly in the database.
        added = subprocess.run([sys.executable, "-m", "pipeline", "users", "add", "alice", "--password",
                                "alice-secret"], cwd=REPO, env=env, capture_output=True, text=True)
        assert added.returncode == 0, added.stderr
        token = subprocess.run([sys.executable, "-m", "pipeline", "users", "token", "alice"], cwd=REPO, env=env,
                               capture_output=True, text=True)
        assert token.returncode == 0, token.stderr
        tokens = {"alice": token.stdout.strip()}
        for name, role in (("bob", "producer"), ("carol", "producer"), ("root", "admin")):
            tokens[name] = add_account(env, name, role)
        s = Stack(root, env, tokens, endpoint, ServiceProcess(env, log=root / "serve.log"))
        s.start()
        yield s
        s.kill()
    finally:
        stop_local_head(endpoint)
        now = json.loads((root / "data" / "ray" / "head.json").read_text())
        if now["pgid"] != endpoint.pgid:  # the head the service started in place of a killed one
            stop_local_head(JobsEndpoint(now["dashboard_url"], None, local=True, pgid=now["pgid"],
                                         temp_dir=now.get("temp_dir")))
    assert endpoint.temp_dir and not Path(endpoint.temp_dir).exists()  # its session folder went with it


def shot_done(progress: Path) -> bool:
    """Whether a render's progress file says a first shot is finished."""
    lines = progress.read_text().splitlines() if progress.exists() else []
    return any(json.loads(line).get("shots_done", 0) >= 1 for line in lines if line.endswith("}"))


def wait_for(predicate, timeout_s: float = 180, what: str = "condition", poll_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    pytest.fail(f"timed out waiting for {what}")


def billed_twice(stack: Stack, script: Path) -> int:
    """Content keys with more than one finished node's spend note in the store."""
    from pipeline.config import resolve_settings
    from pipeline.ledger import episode_ledger
    from pipeline.store import open_store

    settings = resolve_settings(env=stack.env)
    plan = _plan(settings, script)
    book = episode_ledger(plan, open_store(settings.store))
    finished = Counter(n.key for n in book.notes if n.why is None)
    assert finished, "no spend notes: nothing was rendered"
    return sum(1 for c in finished.values() if c > 1)


def _plan(settings, script: Path):
    from pipeline.cli import _prepare

    return _prepare(settings, script, "draft", None)[3]


# ---------------------------------------------------------------------- accounts and isolation


def test_every_api_route_refuses_without_credentials(stack):
    from pipeline.config import resolve_settings
    from pipeline.service.app import create_app

    paths = create_app(resolve_settings(env=stack.env), dispatch=False).openapi()["paths"]  # every route it has
    checked = 0
    for template, methods in paths.items():
        if not template.startswith("/api"):
            continue
        path = template.replace("{job_id}", "1").replace("{shot}", "x").replace("{name}", "episode.mp4")
        for method in methods:
            if (method, template) == ("post", "/api/session"):
                continue
            for headers in ({}, {"Authorization": "Bearer anim_not-a-token"}):
                r = httpx.request(method.upper(), stack.url + path, headers=headers,
                                  cookies={"anim_session": "forged"}, timeout=10)
                assert r.status_code == 401, (method, path, r.status_code, r.text)
                assert r.json()["error"]
            checked += 1
    assert checked >= 15  # every route of the contract


def test_sign_in_sets_a_safe_cookie_and_changes_need_the_page_header(stack):
    with httpx.Client(base_url=stack.url) as web:
        assert web.post("/api/session", data={"username": "alice", "password": "wrong-one"}).status_code == 401
        r = web.post("/api/session", data={"username": "alice", "password": "alice-secret"})
        assert r.status_code == 200, r.text
        cookie = r.headers["set-cookie"].lower()
        assert "anim_session=" in cookie and "httponly" in cookie and "samesite=lax" in cookie
        assert web.get("/api/me").json() == {"username": "alice", "role": "producer"}
        assert web.post("/api/jobs/1/cancel").status_code == 403  # a cookie change without X-Anim
        assert web.request("DELETE", "/api/session", headers={"X-Anim": "1"}).status_code == 200
        assert web.get("/api/me").status_code == 401


def test_bad_script_is_refused_with_the_clis_line(stack):
    bad = stack.script("broken.yaml", "title: x\nscenes:\n  - heading: EXT. A - DAY\n    shots: [{duration: -1}]\n")
    cli = subprocess.run([sys.executable, "-m", "pipeline", "plan", str(bad.name)], cwd=stack.root, env=stack.env,
                         capture_output=True, text=True)
    assert cli.returncode == 2
    cli_line = cli.stderr.strip().removeprefix("error:").strip()
    with stack.client() as c:
        for call in (c.plan, c.submit):
            with pytest.raises(ServiceError) as caught:
                call(bad)
            assert caught.value.status == 422 and str(caught.value) == cli_line
        assert not [j for j in c.jobs() if j["script_name"] == "broken.yaml"]
        with pytest.raises(ServiceError, match="unknown profile"):
            c.plan(stack.script("ok.yaml", tiny_script("ok")), profile="../../etc/passwd")


def test_plan_estimate_and_chinese_title(stack):
    with stack.client() as c:
        est = c.plan(REPO / "examples" / "episode_zh.fountain")
    assert est["estimate_yuan"] > 0 and est["shots"] > 0 and est["frames"] > 0 and est["per_stage"]
    assert any("\u4e00" <= ch <= "\u9fff" for ch in est["title"])


# ---------------------------------------------------------------------- the lifecycle


def test_lifecycle_to_a_downloaded_episode(stack, tmp_path):
    # spoken: the no-op test needs a voice node
    script = stack.script("life.yaml", tiny_script("life", line="灯笼亮了。"))
    with stack.client() as c:
        job = c.submit(script, budget_yuan=5.0, series="测试系列")
        assert job["status"] in ("queued", "rendering") and job["producer"] == "alice"
        assert job["series"] == "测试系列" and job["title"] == "服务测试 life"
        # events: the first one at once, then one per change until the end
        seen = []
        with httpx.stream("GET", f"{stack.url}/api/jobs/{job['id']}/events", timeout=240,
                          headers={"Authorization": f"Bearer {stack.tokens['alice']}"}) as events:
            for line in events.iter_lines():
                if line.startswith("data: "):
                    seen.append(json.loads(line[6:]))
        done = c.job(job["id"])
        assert done["status"] == "succeeded", (done, c.logs(job["id"]))
        assert seen[-1]["status"] == "succeeded" and "rendering" in {e["status"] for e in seen}
        assert done["progress"]["shots_done"] == done["progress"]["shots_total"] == 2
        assert 0 < done["progress"]["spent_yuan"] <= 5.0
        assert {"episode.mp4", "storyboard.png", "subtitles.srt", "timeline.otio", "cost.json"} <= set(done["files"])
        episode = c.download(job["id"], "episode.mp4", tmp_path)
        assert episode.read_bytes()[4:8] == b"ftyp"
        assert "episode:" in c.logs(job["id"], tail=50)
        assert done["submission_id"] == f"anim-{job['id']}-1" and done["attempt"] == 1
    # the Ray job carries the metadata; the MLflow run exists
    info = stack.endpoint.client().get_job_info(done["submission_id"])
    assert info.metadata["job"] == str(job["id"]) and info.metadata["producer"] == "alice"
    assert info.metadata["series"] == "测试系列" and float(info.metadata["budget_yuan"]) == 5.0
    import mlflow

    run = mlflow.MlflowClient(stack.env["MLFLOW_TRACKING_URI"]).get_run(done["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    # the progress file names the run's experiment too: an MLflow server's run page lies under it
    lines = (stack.root / "data" / "jobs" / str(job["id"]) / "progress-1.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])
    assert last["event"] == "end" and (last["run_id"], last["experiment_id"]) == (run.info.run_id,
                                                                                  run.info.experiment_id)


def test_no_op_rerender_runs_in_the_warm_service(stack, tmp_path):
    """Every node in the store: the service renders it itself, no Ray job, same outputs — with a
    budget too (the lifecycle's budgeted render stored the contact sheet a budget always publishes)."""
    with stack.client() as c:
        first = next(j for j in c.jobs(status="succeeded") if j["script_name"] == "life.yaml")
        again = c.wait(c.submit(stack.root / "life.yaml", series="测试系列")["id"], timeout_s=120)
        assert again["status"] == "succeeded" and again["runner"] == "service", c.logs(again["id"])
        assert again["progress"]["spent_yuan"] == 0 and "episode:" in c.logs(again["id"])
        budgeted = c.wait(c.submit(stack.root / "life.yaml", series="测试系列", budget_yuan=5.0)["id"],
                          timeout_s=120)
        assert budgeted["status"] == "succeeded" and budgeted["runner"] == "service", c.logs(budgeted["id"])
        assert again["mlflow_open"].startswith("mlflow ui --backend-store-uri sqlite:///")
        a = c.download(first["id"], "episode.mp4", tmp_path / "first.mp4")
        b = c.download(again["id"], "episode.mp4", tmp_path / "again.mp4")
    assert a.read_bytes() == b.read_bytes()
    assert again["submission_id"] not in [j.submission_id for j in stack.ray_jobs()]


def test_producers_see_only_their_own_jobs(stack):
    with stack.client("alice") as alice, stack.client("bob") as bob, stack.client("root") as admin:
        mine = [j for j in alice.jobs() if j["status"] == "succeeded"]
        assert mine, "the lifecycle test leaves a finished job"
        jid = mine[0]["id"]
        assert all(j["producer"] == "bob" for j in bob.jobs())
        for call in (lambda: bob.job(jid), lambda: bob.logs(jid), lambda: bob.panels(jid), lambda: bob.cancel(jid),
                     lambda: bob.retry(jid), lambda: bob.download(jid, "episode.mp4", stack.root / "stolen.mp4")):
            with pytest.raises(ServiceError) as caught:
                call()
            assert caught.value.status == 404
        assert not (stack.root / "stolen.mp4").exists()
        assert admin.job(jid)["producer"] == "alice"
        assert {j["producer"] for j in admin.jobs(producer="alice")} == {"alice"}


def test_upload_names_and_file_names_cannot_reach_outside(stack):
    data = stack.root / "data"
    with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {stack.tokens['carol']}"}) as c:
        r = c.post("/api/jobs", data={"profile": "draft"},
                   files={"script": ("../../../../escape/evil.yaml", tiny_script("evil").encode())})
        assert r.status_code == 201, r.text
        job = r.json()
        assert job["script_name"] == "evil.yaml"
        assert (data / "jobs" / str(job["id"]) / "script.yaml").is_file()
        assert not list(stack.root.glob("**/escape")) and not Path("/escape").exists()
        for name in ("..%2F..%2Fservice.db", "%2E%2E", "script.yaml", "..%2Fscript.yaml"):
            assert c.get(f"/api/jobs/{job['id']}/files/{name}").status_code == 404, name
        c.post(f"/api/jobs/{job['id']}/cancel")


def test_a_submission_sent_again_with_its_idempotency_key_queues_nothing(stack):
    """A client retrying after a timeout (or a resumed nightly) sends its key again: the jobs the first
    request queued come back, status 200; the key is the producer's own."""
    one = stack.script("key-one.yaml", tiny_script("key-one", shots=1))
    two = stack.script("key-two.yaml", tiny_script("key-two", shots=1))
    with stack.client("alice") as alice, stack.client("bob") as bob:
        first = alice.submit(one, key="retry-1")
        before = len(alice.jobs())
        again = alice.http.post("/api/jobs", files=[("script", ("one.yaml", one.read_bytes()))],
                                data={"profile": "draft"}, headers={"Idempotency-Key": "retry-1"})
        assert again.status_code == 200 and again.json()["id"] == first["id"] and len(alice.jobs()) == before
        batch = alice.submit([one, two], key="night-7")
        assert [j["id"] for j in alice.submit([one, two], key="night-7")["jobs"]] == [j["id"] for j in batch["jobs"]]
        other = bob.submit(one, key="retry-1")  # another producer's key space
        assert other["id"] != first["id"]
        wild = alice.submit(one, key="retry_%")  # LIKE's wildcards in a key are plain characters
        assert wild["id"] not in (first["id"], *[j["id"] for j in batch["jobs"]])
        with pytest.raises(ServiceError, match="Idempotency-Key"):
            alice.submit(one, key="x" * 200)
        for c, j in [(alice, first), (alice, batch["jobs"][0]), (alice, batch["jobs"][1]), (bob, other),
                     (alice, wild)]:
            c.cancel(j["id"])


# ---------------------------------------------------------------------- Ray Jobs


def test_resubmission_is_idempotent(stack):
    """A service that died after Ray took a submission but before it wrote so submits the same id
    again at the next tick: Ray refuses the duplicate, the job is followed, nothing runs twice."""
    from sqlalchemy import create_engine, text

    with stack.client() as c:
        job = next(j for j in c.jobs(status="succeeded"))
    engine = create_engine(f"sqlite:///{stack.root / 'data' / 'service.db'}")
    with engine.begin() as conn:  # the state just before the submission was recorded as taken
        conn.execute(text("UPDATE jobs SET status='rendering', submitted=0 WHERE id=:id"), {"id": job["id"]})
    with stack.client() as c:
        again = c.wait(job["id"], timeout_s=60)
    assert again["status"] == "succeeded" and again["attempt"] == job["attempt"]
    ids = [j.submission_id for j in stack.ray_jobs()]
    assert ids.count(job["submission_id"]) == 1
    assert not [i for i in ids if i.startswith(f"anim-{job['id']}-") and i != job["submission_id"]]


def test_cancel_stops_the_ray_job(stack):
    script = stack.script("cancel.yaml", tiny_script("cancel", shots=6))
    with stack.client() as c:
        job = c.submit(script)
        c.wait(job["id"], until=("rendering",), timeout_s=60, poll_s=0.1)
        cancelled = c.cancel(job["id"])
        assert cancelled["status"] == "cancelled"
        with pytest.raises(ServiceError, match="cancelled already"):
            c.cancel(job["id"])
    client = stack.endpoint.client()
    wait_for(lambda: str(client.get_job_status(cancelled["submission_id"])) in ("STOPPED", "JobStatus.STOPPED",
                                                                              "FAILED", "JobStatus.FAILED"),
             60, "the Ray job to stop")
    time.sleep(1.5)
    with stack.client() as c:
        assert c.job(job["id"])["status"] == "cancelled"  # stays so: the reconciler does not revive it
        retried = c.retry(job["id"])
        assert retried["status"] in ("queued", "rendering")
        c.cancel(job["id"])


def test_approval_gate_stops_for_panels_then_renders(stack):
    script = stack.script("gate.yaml", tiny_script("gate"))
    with stack.client() as c, stack.client("bob") as bob:
        job = c.submit(script, approval_gate=True)
        waiting = c.wait(job["id"], until=("awaiting_approval", "failed", "succeeded"), timeout_s=180)
        assert waiting["status"] == "awaiting_approval", c.logs(job["id"])
        assert "storyboard.png" in waiting["files"] and "episode.mp4" not in waiting["files"]
        panels = c.panels(job["id"])
        assert [p["decision"] for p in panels] == ["pending", "pending"]
        png = httpx.get(stack.url + panels[0]["url"], headers={"Authorization": f"Bearer {stack.tokens['alice']}"})
        assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
        with pytest.raises(ServiceError) as caught:
            bob.approve(job["id"], panels[0]["shot"])
        assert caught.value.status == 404
        with pytest.raises(ServiceError, match="comment"):
            c.approve(job["id"], panels[0]["shot"], "reject")
        after_one = c.approve(job["id"], panels[0]["shot"], comment="good framing")
        assert after_one["status"] == "awaiting_approval"
        decided = c.panels(job["id"])[0]
        assert decided["decision"] == "approved" and decided["by"] == "alice" and decided["comment"] == "good framing"
        c.approve(job["id"], panels[1]["shot"])
        done = c.wait(job["id"], timeout_s=180)
        assert done["status"] == "succeeded" and "episode.mp4" in done["files"], c.logs(job["id"])
        assert done["attempt"] == 2  # the storyboard, then the render


def test_rejected_panel_stops_the_job(stack):
    script = stack.script("reject.yaml", tiny_script("reject", shots=1))
    with stack.client() as c:
        job = c.submit(script, approval_gate=True)
        c.wait(job["id"], until=("awaiting_approval",), timeout_s=180)
        [panel] = c.panels(job["id"])
        stopped = c.approve(job["id"], panel["shot"], "reject", comment="Mei should face the river")
    assert stopped["status"] == "stopped" and stopped["stopped_reason"] == "approval"


def test_batch_is_all_or_nothing_and_queue_bounds_renders(stack):
    scripts = [stack.script(f"batch{i}.yaml", tiny_script(f"batch{i}", shots=1)) for i in range(3)]
    with stack.client("bob") as bob:
        before = len(bob.jobs())
        with pytest.raises(ServiceError, match="nothing was queued") as caught:
            bob.submit(scripts, batch_budget_yuan=1e-9)
        assert caught.value.status == 422 and len(bob.jobs()) == before
        made = bob.submit(scripts, batch_budget_yuan=10.0)["jobs"]
        assert len(made) == 3 and len({j["batch"] for j in made}) == 1
        done = [bob.wait(j["id"], timeout_s=300) for j in made]
    assert [j["status"] for j in done] == ["succeeded"] * 3
    # the job table's events: never more than ANIM_SERVICE_MAX_RENDERS=2 active at once
    from sqlalchemy import create_engine, text

    engine = create_engine(f"sqlite:///{stack.root / 'data' / 'service.db'}")
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT job_id, status FROM job_events ORDER BY id")).all()
    active, peak = set(), 0
    for job_id, status in rows:
        (active.add if status in ("planning", "rendering") else active.discard)(job_id)
        peak = max(peak, len(active))
    assert peak == 2


def test_the_queue_policy_reads_the_clusters_cpu_slots_and_a_setting_fixes_it(stack):
    """Extra renders are admitted only into an idle CPU slot, read from the head's dashboard."""
    from pipeline.config import resolve_settings
    from pipeline.service.app import queue_policy
    from pipeline.service.cluster import JobsEndpoint, Load
    from pipeline.service.jobs import QueuePolicy

    load = stack.endpoint.load()
    assert load is not None and load.cpus == 2 and 0 <= load.cpus_used <= 2
    assert JobsEndpoint("http://127.0.0.1:9", None, local=True).load() is None  # no dashboard: unknown
    assert Load(1.0, 2.0, pending=False).idle and not Load(2.0, 2.0, pending=False).idle
    assert not Load(0.0, 2.0, pending=True).idle  # work waiting for a GPU, say: no extra driver
    assert not Load(1.0, 2.0, pending=False, cpu_busy=0.9).idle  # slots free, processors not: drivers use them
    assert load.cpu_busy is not None and 0.0 <= load.cpu_busy <= 1.0
    assert queue_policy(resolve_settings(env=stack.env), stack.endpoint) == QueuePolicy(2, 2)  # the setting
    unset = {k: v for k, v in stack.env.items() if k != "ANIM_SERVICE_MAX_RENDERS"}
    assert queue_policy(resolve_settings(env=unset, num_cpus=2), stack.endpoint) == QueuePolicy(2, 4)


def test_two_jobs_of_one_script_compute_each_node_once(stack):
    script = stack.script("twice.yaml", tiny_script("twice", shots=2))
    with stack.client("alice") as alice, stack.client("bob") as bob:
        a, b = alice.submit(script), bob.submit(script)
        done = [alice.wait(a["id"], timeout_s=300), bob.wait(b["id"], timeout_s=300)]
    assert [j["status"] for j in done] == ["succeeded", "succeeded"]
    assert billed_twice(stack, script) == 0


# ---------------------------------------------------------------------- things dying


@pytest.mark.slow
def test_sigkilled_service_restarts_and_reconciles(stack):
    script = stack.script("sigkill.yaml", tiny_script("sigkill", shots=4))
    with stack.client() as c:
        job = c.submit(script)
        c.wait(job["id"], until=("rendering",), timeout_s=60, poll_s=0.1)
    progress = stack.root / "data" / "jobs" / str(job["id"]) / "progress-1.jsonl"
    wait_for(lambda: progress.exists(), 60, "the render to start")
    stack.kill()  # mid-render; the Ray job goes on without it
    assert str(stack.endpoint.client().get_job_status(f"anim-{job['id']}-1")) in ("RUNNING", "JobStatus.RUNNING",
                                                                               "SUCCEEDED", "JobStatus.SUCCEEDED")
    stack.start()
    with stack.client() as c:
        done = c.wait(job["id"], timeout_s=180)
    assert done["status"] == "succeeded" and done["attempt"] == 1 and "episode.mp4" in done["files"]
    assert billed_twice(stack, script) == 0


@pytest.mark.slow
def test_killed_driver_is_resubmitted_and_resumes_from_the_store(stack):
    script = stack.script("driver.yaml", tiny_script("driver", shots=6))
    with stack.client() as c:
        job = c.submit(script)
        progress = stack.root / "data" / "jobs" / str(job["id"]) / "progress-1.jsonl"
        wait_for(lambda: shot_done(progress), 120, "a first finished shot", poll_s=0.05)
        drivers = [p for p in psutil.process_iter(["cmdline"]) if str(progress) in (p.info["cmdline"] or [])]
        assert len(drivers) == 1
        drivers[0].send_signal(signal.SIGKILL)
        done = c.wait(job["id"], timeout_s=240)
    assert done["status"] == "succeeded", done
    assert done["attempt"] == 2 and done["submission_id"] == f"anim-{job['id']}-2"
    assert billed_twice(stack, script) == 0
    # ¥ so far is the job's across both attempts: what the killed driver paid for, then the rest
    first = [json.loads(line).get("spent_yuan") for line in progress.read_text().splitlines() if line.endswith("}")]
    paid_first = max(v for v in first if v is not None)
    assert paid_first > 0 and done["progress"]["spent_yuan"] >= paid_first


def test_a_local_head_that_dies_is_replaced_and_its_job_resumes_there(stack):
    """The whole head killed mid-render (its node lost): the service starts a new head once the old
    one has not worked for HEAD_DEAD_S, and the job, unknown to the new head, resumes there as a new
    attempt, paying for no node twice. (Last in the module: the stack's head is a new one after it.)"""
    script = stack.script("head.yaml", tiny_script("head", shots=4))
    record = stack.root / "data" / "ray" / "head.json"
    with stack.client() as c:
        job = c.submit(script)
        progress = stack.root / "data" / "jobs" / str(job["id"]) / "progress-1.jsonl"
        wait_for(lambda: shot_done(progress), 120, "a first finished shot", poll_s=0.05)
        old = json.loads(record.read_text())
        os.killpg(old["pgid"], signal.SIGKILL)
        done = c.wait(job["id"], timeout_s=480)
    new = json.loads(record.read_text())
    assert new["pgid"] != old["pgid"] and new["dashboard_url"] != old["dashboard_url"]
    assert done["status"] == "succeeded", done
    assert done["attempt"] >= 2 and done["submission_id"] == f"anim-{job['id']}-{done['attempt']}"
    assert billed_twice(stack, script) == 0


def test_serve_refuses_to_listen_beyond_loopback_without_accounts(tmp_path):
    env = isolated_env(tmp_path)
    done = subprocess.run([sys.executable, "-m", "pipeline", "serve", "--host", "0.0.0.0"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--host 0.0.0.0" in done.stderr and "anim users add" in done.stderr
    assert not (tmp_path / "data" / "ray").exists()  # refused before any cluster was started
