"""Series manifests: what a valid one resolves to, and every problem as one line naming the
manifest's line; night starts from the cron schedule in its time zone."""
from __future__ import annotations

from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import pytest

from pipeline.series import SeriesError, load_series, nights_between

from .conftest import REPO

EXAMPLE = REPO / "examples" / "series" / "paper_crane.toml"


def write(tmp_path, text: str, scripts=("ep01.fountain", "ep02.fountain")):
    for name in scripts:
        (tmp_path / name).write_text("INT. ROOM - DAY\n\nHANA waves.\n", encoding="utf-8")
    path = tmp_path / "series.toml"
    path.write_text(text, encoding="utf-8")
    return path


def error(path) -> SeriesError:
    with pytest.raises(SeriesError) as exc:
        load_series(path)
    assert "\n" not in str(exc.value)
    return exc.value


def test_the_example_manifest_resolves():
    series = load_series(EXAMPLE)
    assert [e.script.name for e in series.episodes] == ["episode_en.fountain", "episode_zh.fountain"]
    assert [e.priority for e in series.episodes] == [0, 1]
    assert [(d.profile, d.aspect) for d in series.deliveries] == [("draft", "16:9")]
    assert series.night_cap_yuan == 2.0 and series.episode_budget_yuan == 0.5
    assert series.results == (REPO / "out" / "series" / "paper-crane")
    assert series.schedule.cron == "30 2 * * *" and series.schedule.timezone == "Asia/Shanghai"


def test_globs_in_order_profiles_times_aspects_and_per_episode_budgets(tmp_path):
    (tmp_path / "s2").mkdir()
    for name in ("ep03.fountain", "ep01.fountain", "ep02.fountain", "notes.txt"):
        (tmp_path / "s2" / name).write_text("INT. ROOM - DAY\n\nHANA waves.\n")
    (tmp_path / "pilot.fountain").write_text("INT. ROOM - DAY\n\nTARO waves.\n")
    path = write(tmp_path, 'name = "S"\nepisodes = [{ path = "pilot.fountain", budget_yuan = 3.0 }, "s2/ep*"]\n'
                 'profiles = ["draft", "standard"]\naspects = ["16:9", "9:16"]\nepisode_budget_yuan = 1.0\n',
                 scripts=())
    series = load_series(path)
    assert [e.script.name for e in series.episodes] == ["pilot.fountain", "ep01.fountain", "ep02.fountain",
                                                        "ep03.fountain"]
    assert [series.budget_for(e) for e in series.episodes] == [3.0, 1.0, 1.0, 1.0]
    assert [(d.profile, d.aspect) for d in series.deliveries] == [
        ("draft", "16:9"), ("draft", "9:16"), ("standard", "16:9"), ("standard", "9:16")]
    assert series.schedule is None and series.night_of(datetime.now(timezone.utc)) is None


@pytest.mark.parametrize("text, line, words", [
    ('name = "S"\nepisodes = ["ep01.fountain"]\ntpyo = 1\n', 3, "tpyo: unknown setting"),
    ('episodes = ["ep01.fountain"]\n', 1, "name: Field required"),
    ('name = "S"\nepisodes = [\n  "ep01.fountain",\n  "ep09.fountain",\n]\n', 4, "'ep09.fountain': no such script"),
    ('name = "S"\nepisodes = ["ep01.fountain", "x/*.fountain"]\n', 2, "matches no script"),
    ('name = "S"\nepisodes = ["ep01.fountain", "ep01.fountain"]\n', 2, "listed twice"),
    ('name = "S"\nepisodes = []\n', 2, "episodes: List should have at least 1 item"),
    ('name = "S"\nepisodes = [\n  "ep01.fountain",\n  { path = "ep02.fountain", budget_yuan = -1 },\n]\n', 4,
     "episodes[2].budget_yuan: Input should be greater than or equal to 0"),
    ('name = "S"\nepisodes = ["ep01.fountain"]\nprofiles = ["draft",\n  "drfat"]\n', 4,
     "profiles: unknown profile 'drfat'"),
    ('name = "S"\nepisodes = ["ep01.fountain"]\naspects = ["4:3"]\n', 3, "'4:3' is not an aspect"),
    ('name = "S"\nepisodes = ["ep01.fountain"]\nnight_cap_yuan = nan\n', 3, "night_cap_yuan: nan is not a finite"),
    ('name = "S"\nepisodes = ["ep01.fountain"]\norder = "random"\n', 3, "order: Input should be 'script' or"),
    ('name = "S"\nepisodes = ["ep01.fountain"]\n\n[schedule]\ncron = "30 2 * *"\n', 5,
     "schedule.cron: '30 2 * *' is not a five-field cron expression"),
    ('name = "S"\nepisodes = ["ep01.fountain"]\n\n[schedule]\ncron = "30 2 * * *"\ntimezone = "Asia/Shangai"\n', 6,
     "schedule.timezone: 'Asia/Shangai' is not an IANA time zone"),
    ('name = "S"\nepisodes = ["ep01.fountain"]\n[schedule]\ncron = "0 1 * * *"\nmissed = "all"\n', 5,
     "schedule.missed: Input should be 'latest' or 'skip'"),
    ('name = "S"\nepisodes = ["ep01.fountain"\n', 2, "not valid TOML"),
    ('name = "S"\nepisodes = ["series.toml"]\n', 2, "not a script"),
])
def test_a_bad_manifest_is_one_line_naming_its_line(tmp_path, text, line, words):
    path = write(tmp_path, text)
    exc = error(path)
    assert exc.line == line, str(exc)
    assert str(exc).startswith(f"{path}:{line}: ") and words in str(exc), str(exc)


def test_a_missing_manifest_and_a_folder(tmp_path):
    assert "series manifest not found" in str(error(tmp_path / "nope.toml"))
    assert "is a folder" in str(error(tmp_path))


def test_nights_follow_the_cron_in_its_time_zone():
    from pipeline.series import ScheduleSpec

    spec = ScheduleSpec(cron="30 2 * * *", timezone="Asia/Shanghai")
    now = datetime(2026, 12, 3, 1, 0, tzinfo=ZoneInfo("Asia/Shanghai"))  # before tonight's 02:30
    (latest,) = nights_between(spec, None, now)
    assert latest == datetime(2026, 12, 2, 2, 30, tzinfo=ZoneInfo("Asia/Shanghai"))
    after = datetime(2026, 11, 29, 18, 30, tzinfo=timezone.utc)  # = 11-30 02:30 in Shanghai
    assert [n.day for n in nights_between(spec, after, now)] == [1, 2]
    # A night exactly at its start belongs to that night.
    assert nights_between(spec, None, latest)[0] == latest
    # Daylight saving: 02:30 in Berlin is still one night a day across the change (02:30 happens
    # twice on 10-25; both belong to the night that began at the first).
    berlin = ScheduleSpec(cron="30 2 * * *", timezone="Europe/Berlin")
    nights = nights_between(berlin, datetime(2026, 10, 23, tzinfo=timezone.utc),
                            datetime(2026, 10, 27, 12, tzinfo=timezone.utc))
    assert [n.day for n in nights] == [23, 24, 25, 26, 27]
    second = datetime(2026, 10, 25, 1, 45, tzinfo=timezone.utc)  # 02:45 CET, after the second 02:30
    assert nights_between(berlin, None, second) == [nights[2]] and nights[2].utcoffset().seconds == 7200
    with pytest.raises(ValueError):
        nights_between(spec, None, datetime(2026, 12, 3))  # a naive time is a mistake
