"""The budget guard's bookkeeping, without Ray: what may start, what is committed, how the margins
learn, and when the cap says stop."""
import pytest

from pipeline.budget import BudgetGuard


def test_no_budget_admits_everything_and_never_stops():
    guard = BudgetGuard(None)
    guard.reserve("a", 1e9)
    guard.accrue("a", 1e9)
    assert guard.fits(1e12) and not guard.capped
    assert not guard.over(1e9) and not guard.overcommitted()


def test_admits_while_spent_reserved_and_estimate_fit():
    guard = BudgetGuard(10.0, margin=0.25)  # margin 1.25
    assert guard.fits(8.0) and not guard.fits(8.01)  # 8 × 1.25 = 10
    guard.reserve(("s1", "keyframes"), 4.0)  # holds 5
    assert guard.reserved == pytest.approx(5.0)
    assert guard.fits(4.0) and not guard.fits(4.1)
    guard.charge(3.0)
    guard.finish(("s1", "keyframes"), 3.0)  # cheaper than estimated: the reservation is freed
    assert guard.spent == 3.0 and guard.reserved == 0.0 and guard.margin == 1.25
    assert guard.fits(5.6) and not guard.fits(5.61)


def test_the_episodes_earlier_spend_counts_against_the_budget():
    guard = BudgetGuard(10.0, margin=0.0, spent=7.0)
    assert guard.fits(3.0) and not guard.fits(3.01)
    with pytest.raises(ValueError, match="spent"):
        BudgetGuard(10.0, spent=-1.0)


def test_a_stage_margin_follows_its_summed_overrun_not_its_worst_node():
    guard = BudgetGuard(100.0, margin=0.25)
    for node, actual in (("a", 2.0), ("b", 0.5)):  # one node at 2×, one at 0.5×: 2.5 over 2 estimated
        guard.reserve(node, 1.0, stage="keyframes")
        guard.charge(actual)
        guard.finish(node, actual)
    assert guard.ratio("keyframes") == pytest.approx(1.25)
    assert guard.margin_for("keyframes") == pytest.approx(1.1 * 1.25)
    # a stage that ran faster than its rows never goes below the starting margin
    guard.reserve("c", 1.0, stage="clip")
    guard.finish("c", 0.1)
    assert guard.margin_for("clip") == 1.25


def test_a_stage_not_measured_takes_what_every_measured_stage_shows_together():
    guard = BudgetGuard(100.0, margin=0.25)
    assert not guard.known("clip") and guard.margin_for("clip") == 1.25
    guard.reserve("s1", 1.0, stage="storyboard")
    guard.finish("s1", 3.0)  # the machine is three times slower than its rows
    assert guard.known("storyboard") and not guard.known("clip")
    assert guard.margin_for("clip") == pytest.approx(3.3) == guard.margin
    guard.reserve("k1", 3.0, stage="keyframes")  # reserved at 3.3 before its own stage is known
    assert guard.reservation("k1") == pytest.approx(9.9)


def test_history_starts_the_margins():
    guard = BudgetGuard(100.0, margin=0.25, history={"clip": (6.0, 2.0), "keyframes": (1.0, 0.0)})
    assert guard.known("clip") and guard.margin_for("clip") == pytest.approx(3.3)
    assert not guard.known("keyframes")  # nothing estimated: no evidence
    guard.reserve("c", 2.0, stage="clip")
    guard.finish("c", 2.0)  # this render: 1×; with history, (6 + 2) / (2 + 2) = 2
    assert guard.margin_for("clip") == pytest.approx(2.2)


def test_a_running_node_is_committed_at_its_cost_so_far_once_that_passes_its_reservation():
    guard = BudgetGuard(10.0, margin=0.0)
    guard.reserve("a", 4.0)
    guard.accrue("a", 1.0)
    assert guard.reserved == 4.0 and not guard.overcommitted()
    guard.accrue("a", 7.0)
    assert guard.reserved == 7.0 and not guard.fits(3.01) and guard.fits(3.0)
    guard.reserve("b", 4.0)  # admitted earlier at its estimate: now the two no longer fit
    assert guard.overcommitted()
    guard.release("b")
    assert not guard.overcommitted()


def test_over_counts_spent_cost_so_far_and_what_stopping_takes():
    guard = BudgetGuard(10.0, margin=0.0, spent=6.0)
    guard.reserve("a", 1.0)
    guard.accrue("a", 3.0)
    assert not guard.over() and not guard.over(0.99)
    assert guard.over(1.0)  # 6 + 3 + 1 reaches the budget
    guard.charge(3.5)
    guard.finish("a", 3.5)
    assert guard.accrued == 0.0 and guard.spent == 9.5 and guard.over(0.5)


def test_shared_prerequisites_reserve_without_teaching_the_margin():
    guard = BudgetGuard(100.0, margin=0.0)
    guard.reserve(("plate-key", "plates"), 1.0, stage="plates", learn=False)
    guard.charge(5.0)
    guard.finish(("plate-key", "plates"), 5.0)
    assert guard.margin == 1.0 and not guard.known("plates") and guard.reserved == 0.0 and guard.spent == 5.0


def test_several_nodes_fit_together_or_not_at_all():
    guard = BudgetGuard(10.0, margin=0.0, history={"clip": (2.0, 1.0)})  # clips at 2.2×
    assert guard.fits_all([(2.0, "keyframes"), (2.0, "clip")])  # 2 × 2.2 + 2 × 2.2 = 8.8
    assert not guard.fits_all([(2.0, "keyframes"), (2.6, "clip")])


def test_zero_budget_admits_only_free_nodes_and_negative_is_refused():
    guard = BudgetGuard(0.0)
    assert guard.fits(0.0) and not guard.fits(1e-9)
    with pytest.raises(ValueError, match="budget_yuan"):
        BudgetGuard(-1.0)
