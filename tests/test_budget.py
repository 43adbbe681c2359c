"""The budget guard's bookkeeping, without Ray: what may start, what is held, how the margin learns."""
import pytest

from pipeline.budget import BudgetGuard


def test_no_budget_admits_everything():
    guard = BudgetGuard(None)
    guard.reserve("a", 1e9)
    assert guard.fits(1e12)


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


def test_margin_grows_to_the_worst_overrun_and_never_shrinks():
    guard = BudgetGuard(100.0, margin=0.25)
    guard.reserve("a", 1.0)
    guard.charge(2.0)
    guard.finish("a", 2.0)  # ran at 2× its estimate
    assert guard.margin == pytest.approx(2.2)
    guard.reserve("b", 1.0)
    guard.charge(0.5)
    guard.finish("b", 0.5)
    assert guard.margin == pytest.approx(2.2)


def test_shared_prerequisites_reserve_without_teaching_the_margin():
    guard = BudgetGuard(100.0, margin=0.0)
    guard.reserve(("plate-key", "plates"), 1.0, learn=False)
    guard.charge(5.0)
    guard.finish((None, "plates"), 5.0)  # finished under another name: nothing learned
    guard.release(("plate-key", "plates"))
    assert guard.margin == 1.0 and guard.reserved == 0.0 and guard.spent == 5.0


def test_zero_budget_admits_only_free_nodes_and_negative_is_refused():
    guard = BudgetGuard(0.0)
    assert guard.fits(0.0) and not guard.fits(1e-9)
    with pytest.raises(ValueError, match="budget_yuan"):
        BudgetGuard(-1.0)
