"""The nightly batch of a series on real components: a local Ray cluster, MLflow on a SQLite
file, ffmpeg, the artifact store and the night records in a SQLite file.

Night one renders every episode; an edit to one line of one episode makes night two render
exactly that shot and the assembly, and the report says so; night three renders nothing and
says so. The night's cap stops admission at a whole episode; the service's loop (``run_due``)
with explicit times, across a restart and missed nights, neither skips nor repeats a night."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from pipeline.config import resolve_settings
from pipeline.nightly import EXIT_DONE, EXIT_STOPPED, NightBook, admit, plan_night, run_due, run_night
from pipeline.series import load_series

TINY = """name = "tiny"
short_side = 64
fps = 24
animate_on = 2
keyframe_stride = 6
interpolation = "flow"
crf = 30
x264_preset = "veryfast"
storyboard_width = 64

[flow]
preset = "ultrafast"
"""
EPISODE = """Title: {title}

INT. ROOM - DAY

[[shot: medium, 1s]]
HANA
{first}

[[shot: close-up, 1s]]
TARO
{second}
"""
UTC = timezone.utc


def make_series(root: Path, *, cap: float | None = None, aspects: str = "", order: str = "script",
                cron: str = "30 2 * * *", missed: str = "latest", grace: int = 360) -> Path:
    (root / "tiny.toml").write_text(TINY)
    for n, (title, first, second) in enumerate((("Tiny One", "Good morning!", "Morning."),
                                               ("Tiny Two", "Is it raining?", "Not yet.")), 1):
        path = root / f"ep{n}.fountain"
        if not path.exists():
            path.write_text(EPISODE.format(title=title, first=first, second=second))
    (root / "series.toml").write_text(
        f'name = "Tiny series"\nepisodes = ["ep1.fountain", {{ path = "ep2.fountain", priority = 5 }}]\n'
        f'profiles = ["tiny.toml"]\n{aspects}\norder = "{order}"\nresults = "out"\n'
        + (f"night_cap_yuan = {cap}\n" if cap is not None else "")
        + f'\n[schedule]\ncron = "{cron}"\ntimezone = "UTC"\nmissed = "{missed}"\ngrace_minutes = {grace}\n')
    return root / "series.toml"


def settings_for(root: Path):
    env = {"HOME": str(root), "XDG_DATA_HOME": str(root / "data"), "XDG_CACHE_HOME": str(root / "cache"),
           "XDG_CONFIG_HOME": str(root / "config"), "ANIM_STORE": str(root / "store"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "ANIM_NIGHTS": str(root / "nights.db")}
    (root / "store").mkdir(exist_ok=True)
    return resolve_settings(env, studio_file=root / "no-studio.toml")


def executed(out_dir: Path) -> set[tuple[str, str | None]]:
    cost = json.loads((out_dir / "cost.json").read_text())
    return {(r["stage"], r["shot"]) for r in cost["records"] if not r["cached"]}


def night_runs(root: Path) -> list:
    from pipeline import tracking

    client = tracking.client(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("Tiny series")
    return client.search_runs([exp.experiment_id], filter_string="tags.kind = 'nightly'",
                              order_by=["attributes.start_time ASC"])


@pytest.mark.slow
@pytest.mark.usefixtures("local_ray")
def test_three_nights_render_all_then_the_edited_shot_then_nothing(tmp_path, capsys):
    from pipeline import nightly_report

    manifest = make_series(tmp_path)
    settings, book = settings_for(tmp_path), NightBook(tmp_path / "nights.db")
    series = load_series(manifest)

    # Night one: every episode, every shot.
    one = run_night(series, settings, now=datetime(2026, 12, 1, 3, 0, tzinfo=UTC), book=book)
    assert one.exit_code == EXIT_DONE and [r.status for r in one.rows] == ["rendered", "rendered"]
    assert all(r.shots_changed == r.shots == 2 and r.spent_yuan > 0 for r in one.rows), one.rows
    assert all(Path(r.out_dir, "episode.mp4").is_file() for r in one.rows)
    night_one = sum(r.spent_yuan for r in one.rows)

    # One line of one episode edited: night two renders that shot and the assembly, nothing else.
    ep1 = tmp_path / "ep1.fountain"
    ep1.write_text(EPISODE.format(title="Tiny One", first="Good evening!", second="Morning."))
    two = run_night(series, settings, now=datetime(2026, 12, 2, 3, 0, tzinfo=UTC), book=book)
    assert two.exit_code == EXIT_DONE
    first, second = two.rows
    assert (first.status, first.shots_changed) == ("rendered", 1)
    assert (second.status, second.shots_changed) == ("unchanged", 0)
    shots = {shot for _, shot in executed(Path(first.out_dir))}
    assert shots == {"sc01-sh01", None}, shots  # HANA's line is the first shot; None: the episode's nodes
    from pipeline.schedule import LEDGER_STAGES

    episode_stages = {stage for stage, shot in executed(Path(first.out_dir)) if shot is None}
    assert "assemble" in episode_stages and episode_stages <= set(LEDGER_STAGES["assemble"]), episode_stages
    assert first.saved_yuan > 0 and second.saved_yuan > 0 and second.spent_yuan == 0
    assert first.prev_flicker == one.rows[0].flicker  # compared with the previous night
    night_two = sum(r.spent_yuan for r in two.rows)
    assert 0 < night_two < night_one
    report = two.report.read_text()
    assert "| ep1.fountain | tiny | rendered | 1/2 |" in report
    assert "| ep2.fountain | tiny | unchanged | 0/2 |" in report
    assert (two.report.parent / "cost_chart.png").stat().st_size > 0

    # Night three: nothing changed, nothing rendered, and it says so.
    three = run_night(series, settings, now=datetime(2026, 12, 3, 3, 0, tzinfo=UTC), book=book)
    assert three.exit_code == EXIT_DONE and [r.status for r in three.rows] == ["unchanged", "unchanged"]
    assert sum(r.spent_yuan for r in three.rows) == 0
    line = nightly_report.headline(series.name, three.night, three.rows)
    assert "nothing changed" in line and "nothing rendered" in line
    assert "nothing changed" in three.report.read_text()

    # One MLflow run per night, in the series' experiment, with the night's totals.
    runs = night_runs(tmp_path)
    assert [r.data.tags["night"] for r in runs] == [one.night, two.night, three.night]
    assert runs[1].data.metrics["night_spent_yuan"] == pytest.approx(night_two)
    assert runs[2].data.metrics["episodes_unchanged"] == 2 and runs[2].data.metrics["shots_changed"] == 0
    # The same night asked again runs nothing.
    again = run_night(series, settings, now=datetime(2026, 12, 3, 4, 0, tzinfo=UTC), book=book)
    assert not again.ran and "already done" in again.note
    print(f"night two / night one cost: {night_two / night_one:.3f} (¥{night_two:.6f} / ¥{night_one:.6f})")


def test_the_nights_cap_stops_admission_at_a_whole_episode(tmp_path):
    manifest = make_series(tmp_path, aspects='aspects = ["16:9", "9:16"]')
    settings = settings_for(tmp_path)
    now = datetime(2026, 12, 1, 3, 0, tzinfo=UTC)
    free = plan_night(load_series(manifest), settings, now=now)
    assert len(free.admitted) == 4 and not free.waiting
    by_episode = {}
    for t in free.items:
        by_episode[t.episode.script.name] = by_episode.get(t.episode.script.name, 0.0) + t.estimate_yuan
    ep1_16x9 = next(t.estimate_yuan for t in free.items if t.episode.index == 0 and t.delivery.aspect == "16:9")
    ep2_16x9 = next(t.estimate_yuan for t in free.items if t.episode.index == 1 and t.delivery.aspect == "16:9")
    # Room for episode 1 and one delivery of episode 2: episode 2 waits whole, both aspects.
    capped = plan_night(load_series(make_series(tmp_path, cap=by_episode["ep1.fountain"] + ep2_16x9,
                                                aspects='aspects = ["16:9", "9:16"]')), settings, now=now)
    assert [(t.episode.index, t.delivery.aspect) for t in capped.admitted] == [(0, "16:9"), (0, "9:16")]
    assert [(t.episode.index, t.delivery.aspect) for t in capped.waiting] == [(1, "16:9"), (1, "9:16")]
    assert capped.estimate_yuan == pytest.approx(by_episode["ep1.fountain"])
    # Ordered by priority, episode 2 goes first and then episode 1 does not fit: the cap stops
    # admission there, it does not skip ahead to whatever still fits.
    pri = plan_night(load_series(make_series(tmp_path, cap=by_episode["ep2.fountain"] + ep1_16x9, order="priority",
                                             aspects='aspects = ["16:9", "9:16"]')), settings, now=now)
    assert [t.episode.index for t in pri.admitted] == [1, 1] and [t.episode.index for t in pri.waiting] == [0, 0]
    # Last night's failure goes first, whatever the order.
    failed = {"ep2.fountain [tiny 16:9]": {"status": "failed"}}
    first = plan_night(load_series(make_series(tmp_path, cap=by_episode["ep2.fountain"] + ep1_16x9,
                                               aspects='aspects = ["16:9", "9:16"]')), settings, now=now,
                       previous=failed)
    assert [t.episode.index for t in first.admitted] == [1, 1] and first.admitted[0].why == "failed last night"
    # Admission is a function of the items: admitting the same ones again gives the same night.
    zero = admit(type(capped)(capped.series, capped.night, capped.items), {})
    assert [t.episode.index for t in zero.admitted] == [0, 0]


def test_the_service_loop_neither_skips_nor_repeats_a_night_across_restarts(tmp_path):
    """``run_due`` with explicit times. The cap of ¥0 keeps every episode waiting, so each night
    that runs is recorded (state "stopped", exit 3) without rendering: what is tested is which
    nights run. A "restart" is a new NightBook on the same database file."""
    manifest = make_series(tmp_path, cap=0.0)
    settings = settings_for(tmp_path)
    db = tmp_path / "nights.db"
    t = lambda day, hour, minute=0: datetime(2026, 12, day, hour, minute, tzinfo=UTC)  # noqa: E731

    def due(now, book=None):
        return [(r.night, r.exit_code) for r in run_due([manifest], settings, now=now, book=book or NightBook(db))
                if r.ran]

    assert due(t(1, 12)) == []  # registered now: last night's 02:30 was before the series was known
    assert due(t(2, 2, 31)) == [("2026-12-02T02:30+00:00", EXIT_STOPPED)]
    assert due(t(2, 3)) == []  # the same night again
    assert due(t(2, 5), NightBook(db)) == []  # after a restart: still that night, already run
    # Down from 12-02 05:00 until 12-04 10:00: the latest missed night runs once, 12-03 is missed.
    assert due(t(4, 10)) == [("2026-12-04T02:30+00:00", EXIT_STOPPED)]
    assert due(t(4, 11), NightBook(db)) == []
    assert due(t(5, 2, 30)) == [("2026-12-05T02:30+00:00", EXIT_STOPPED)]
    states = {r["night"][:10]: r["state"] for r in NightBook(db).nights("Tiny series")}
    assert states == {"2026-12-02": "stopped", "2026-12-03": "missed", "2026-12-04": "stopped",
                      "2026-12-05": "stopped"}
    # Policy "skip" with an hour's grace: a night found five hours late is missed, not run.
    make_series(tmp_path, cap=0.0, missed="skip", grace=60)
    assert due(t(6, 7, 30)) == []
    assert due(t(7, 3)) == [("2026-12-07T02:30+00:00", EXIT_STOPPED)]
    states = {r["night"][:10]: r["state"] for r in NightBook(db).nights("Tiny series")}
    assert states["2026-12-06"] == "missed" and states["2026-12-07"] == "stopped"
    # Each night that ran said why nothing rendered: the cap.
    rows = json.loads(NightBook(db).get("Tiny series", "2026-12-07T02:30+00:00")["rows"])
    assert [r["status"] for r in rows] == ["waiting", "waiting"] and "night's cap" in rows[0]["error"]
    assert len(night_runs(tmp_path)) == 4
    # Nothing is due again the same minute, whoever asks.
    assert due(t(7, 3) + timedelta(seconds=30)) == []


def test_a_night_whose_runner_died_is_resumed_once_while_it_is_the_latest_else_recorded_interrupted(tmp_path):
    """A killed service or cron job leaves its night "running" with a beat that grows stale. Within
    that night the next runner takes it over and finishes it (once); found only after a later night
    began, it is recorded failed ("interrupted") and the later night runs. (Cap ¥0: nothing renders;
    which nights run is what is tested.)"""
    manifest = make_series(tmp_path, cap=0.0)
    settings = settings_for(tmp_path)
    db = tmp_path / "nights.db"
    name = load_series(manifest).name
    t = lambda day, hour, minute=0: datetime(2026, 12, day, hour, minute, tzinfo=UTC)  # noqa: E731

    def due(now):
        return [(r.night, r.exit_code) for r in run_due([manifest], settings, now=now, book=NightBook(db)) if r.ran]

    book = NightBook(db)
    book.registered(name, t(1, 12))
    # 1. A runner claimed the 12-02 night at 02:31 and died without a beat.
    night = "2026-12-02T02:30+00:00"
    assert book.claim(name, night, t(2, 2, 31), owner="gone:1:x")
    assert due(t(2, 2, 33)) == []  # two minutes: it may still be working
    assert due(t(2, 2, 41)) == [(night, EXIT_STOPPED)]  # ten: taken over and finished
    assert NightBook(db).get(name, night)["state"] == "stopped"
    assert due(t(2, 2, 45)) == []  # once
    # 2. Left running on 12-03 and found the next night: interrupted; the 12-04 night runs.
    assert book.claim(name, "2026-12-03T02:30+00:00", t(3, 2, 31), owner="gone:2:y")
    assert due(t(4, 3)) == [("2026-12-04T02:30+00:00", EXIT_STOPPED)]
    record = NightBook(db).get(name, "2026-12-03T02:30+00:00")
    assert record["state"] == "failed" and "interrupted" in record["note"]
    # 3. Two runners that find one stale night at once: exactly one takes it over.
    assert book.claim(name, "2026-12-05T02:30+00:00", t(5, 2, 31), owner="gone:3:z")
    first, second = NightBook(db), NightBook(db)
    assert first.take_over(name, "2026-12-05T02:30+00:00", "a", t(5, 3))
    assert not second.take_over(name, "2026-12-05T02:30+00:00", "b", t(5, 3))
    # and a beat keeps a running night its runner's
    first.beat(name, "2026-12-05T02:30+00:00", "a", t(5, 3, 10))
    assert not NightBook(db).stale(name, "2026-12-05T02:30+00:00", t(5, 3, 12))


def test_a_store_other_nodes_cannot_see_is_refused_on_a_multi_node_cluster():
    from pipeline.dag import store_reach_problem  # asked by dag.Cluster.start of every render that joins a cluster

    assert store_reach_problem("/var/anim/store", 1) is None  # one machine: a local folder is right
    assert store_reach_problem("s3://studio/store", 4) is None
    for local in ("/var/anim/store", "file:///var/anim/store"):
        problem = store_reach_problem(local, 3)
        assert "3 nodes" in problem and "s3://" in problem and "\n" not in problem


def test_the_command_dry_run_and_a_bad_manifest(tmp_path):
    """``anim nightly --dry-run`` prints tonight's renders and records nothing; a bad manifest is
    one line naming its line, exit 2."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    free = plan_night(load_series(make_series(tmp_path)), settings_for(tmp_path), now=datetime.now(UTC))
    manifest = make_series(tmp_path, cap=free.items[0].estimate_yuan * 1.5)  # room for the first episode only
    env = {"HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path / "data"), "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "XDG_CONFIG_HOME": str(tmp_path / "config"), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "ANIM_NIGHTS": str(tmp_path / "nights.db"), "ANIM_STORE": "", "RAY_ADDRESS": ""}
    runner = CliRunner()
    done = runner.invoke(app, ["nightly", str(manifest), "--dry-run", "--now", "2026-12-01T03:00+00:00"], env=env)
    assert done.exit_code == 0, done.output
    assert "tonight: 1 of 2 episodes" in " ".join(done.output.split()) and "waits" in done.output
    assert not (tmp_path / "nights.db").exists() and not (tmp_path / "mlflow.db").exists()
    manifest.write_text(manifest.read_text().replace('order = "script"', 'order = "alphabetical"'))
    done = runner.invoke(app, ["nightly", str(manifest)], env=env)
    assert done.exit_code == 2
    line = " ".join(done.output.split())
    assert f"{manifest}:5: order: Input should be 'script' or 'priority'" in line, line


@pytest.mark.slow
def test_the_night_through_the_render_service(tmp_path):
    """``anim nightly SERIES --server URL``: the renders are submitted to a real ``anim serve``
    (its own process, a real Ray head, the same store) and waited for; the files come back into
    the series' results; the next night with nothing changed submits nothing."""
    import subprocess
    import sys

    from pipeline.service.client import ServiceClient
    from pipeline.service.cluster import local_endpoint, stop_local_head
    from pipeline.service.process import ServiceProcess, add_account, isolated_env

    from .conftest import REPO

    manifest = make_series(tmp_path)
    manifest.write_text(manifest.read_text().replace('"tiny.toml"', '"draft"').replace(
        '"ep1.fountain", { path = "ep2.fountain", priority = 5 }', '"ep1.fountain"'))
    env = isolated_env(tmp_path, ANIM_NIGHTS=str(tmp_path / "nights.db"), XDG_CACHE_HOME=str(tmp_path / "cache"))
    endpoint = local_endpoint(tmp_path / "data", num_cpus=2)
    try:
        token = add_account(env, "nightly", "producer")
        with ServiceProcess(env, log=tmp_path / "serve.log") as service:
            def night(now: str):
                return subprocess.run([sys.executable, "-m", "pipeline", "nightly", str(manifest), "--server",
                                       service.url, "--token", token, "--now", now], cwd=REPO, env=env,
                                      capture_output=True, text=True, timeout=600)

            one = night("2026-12-01T03:00+00:00")
            assert one.returncode == 0, one.stdout + one.stderr + service.tail()
            out = tmp_path / "out" / "ep1-draft-16x9"
            assert (out / "episode.mp4").stat().st_size > 0
            assert json.loads((out / "cost.json").read_text())["total_yuan"] > 0
            jobs = ServiceClient(service.url, token).jobs(series="Tiny series")
            assert [j["status"] for j in jobs] == ["succeeded"]
            two = night("2026-12-02T03:00+00:00")
            assert two.returncode == 0, two.stdout + two.stderr
            assert "nothing changed" in " ".join(two.stdout.split())
            assert len(ServiceClient(service.url, token).jobs(series="Tiny series")) == 1  # nothing submitted
    finally:
        stop_local_head(endpoint)


def test_a_bad_script_fails_its_episode_with_its_line_and_the_others_still_run(tmp_path):
    """Episode 2's script breaks: its row is failed with the reader's one line; episode 1 still
    goes through the night (here it waits: the cap of ¥0 keeps the test from rendering); the
    night exits 1, and the next night takes the failed episode first."""
    from pipeline.nightly import EXIT_FAILED

    manifest = make_series(tmp_path, cap=0.0)
    (tmp_path / "ep2.fountain").write_text("Title: Tiny Two\n\nINT. ROOM - DAY\n\n[[shot: 9000s]]\nHANA waves.\n")
    settings, book = settings_for(tmp_path), NightBook(tmp_path / "nights.db")
    result = run_night(load_series(manifest), settings, now=datetime(2026, 12, 1, 3, tzinfo=UTC), book=book)
    assert result.exit_code == EXIT_FAILED
    waiting, failed = result.rows
    assert (waiting.episode, waiting.status) == ("ep1.fountain", "waiting")
    assert (failed.episode, failed.status) == ("ep2.fountain", "failed")
    assert failed.error.startswith(f"{tmp_path / 'ep2.fountain'}:5: ") and "\n" not in failed.error
    assert "| ep2.fountain | tiny | failed |" in result.report.read_text()
    (tmp_path / "ep2.fountain").write_text(EPISODE.format(title="Tiny Two", first="Fixed.", second="Good."))
    tonight = plan_night(load_series(make_series(tmp_path)), settings, now=datetime(2026, 12, 2, 3, tzinfo=UTC),
                         previous=book.previous_rows("Tiny series", "2026-12-02T02:30+00:00"))
    assert [(t.episode.index, t.why) for t in tonight.admitted] == [(1, "failed last night"), (0, "changed")]


@pytest.mark.slow
def test_the_service_runs_a_series_schedule_itself_once_per_night_across_a_restart(tmp_path):
    """A manifest in the service's series folder (cron every minute here) is run by ``anim serve``
    itself: its night's job is in the table as the ``nightly`` account's and renders; SIGKILL the
    service and start it again, and no night is run twice (the next night finds nothing changed
    and submits nothing)."""
    import time

    from pipeline.nightly import NightBook
    from pipeline.service.client import ServiceClient
    from pipeline.service.cluster import local_endpoint, stop_local_head
    from pipeline.service.process import ServiceProcess, add_account, isolated_env

    make_series(tmp_path, cron="* * * * *")
    folder = tmp_path / "series"
    folder.mkdir()
    (folder / "tiny.toml").write_text((tmp_path / "series.toml").read_text()
                                      .replace('"tiny.toml"', '"draft"').replace('results = "out"', 'results = "../out"')
                                      .replace('"ep1.fountain", { path = "ep2.fountain", priority = 5 }', '"../ep1.fountain"'))
    env = isolated_env(tmp_path, ANIM_NIGHTS=str(tmp_path / "nights.db"), XDG_CACHE_HOME=str(tmp_path / "cache"),
                       ANIM_SERVICE_SERIES=str(folder))
    endpoint = local_endpoint(tmp_path / "data", num_cpus=2)

    def jobs(service, token) -> list[dict]:
        return ServiceClient(service.url, token).jobs(series="Tiny series")

    try:
        token = add_account(env, "lead", "admin")
        with ServiceProcess(env, log=tmp_path / "serve.log") as service:
            deadline = time.monotonic() + 400
            while time.monotonic() < deadline and not any(j["status"] == "succeeded" for j in jobs(service, token)):
                time.sleep(2)
            done = jobs(service, token)
            assert [(j["producer"], j["status"]) for j in done] == [("nightly", "succeeded")], service.tail()
            # the night downloads its job's outputs once it sees the job done (it polls): wait for them
            episode = tmp_path / "out" / "ep1-draft-16x9" / "episode.mp4"
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not episode.is_file():
                time.sleep(0.5)
            assert episode.stat().st_size > 0, service.tail()
            service.kill()
        ran = NightBook(tmp_path / "nights.db").nights("Tiny series")
        with ServiceProcess(env, log=tmp_path / "serve2.log") as service:
            def finished_after_restart() -> bool:
                new = NightBook(tmp_path / "nights.db").nights("Tiny series")[len(ran):]
                return any(n["state"] != "running" for n in new)

            deadline = time.monotonic() + 150  # the next minute's night, checked within 20 s of its start
            while time.monotonic() < deadline and not finished_after_restart():
                time.sleep(2)
            assert finished_after_restart(), service.tail()
            assert len(jobs(service, token)) == 1, service.tail()
        nights = NightBook(tmp_path / "nights.db").nights("Tiny series")
        assert [n["night"] for n in nights[:len(ran)]] == [n["night"] for n in ran]
        assert len({n["night"] for n in nights}) == len(nights) > len(ran), nights  # a new night, none twice
    finally:
        stop_local_head(endpoint)
