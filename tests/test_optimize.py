"""Fitting a render to a budget: the lever ladder, each step priced from the same rows as a plan."""
from __future__ import annotations

import pytest

from pipeline.calibration import Calibration
from pipeline.config import resolve_profile
from pipeline.cost import PriceCatalog
from pipeline.optimize import fit_budget
from pipeline.plan import make_plan
from stages.script import load_episode

from .conftest import REPO

EPISODE = load_episode(REPO / "examples" / "episode_en.fountain")
CAL = Calibration.load(REPO / "cluster" / "calibration.csv")
PRICES = PriceCatalog.load(REPO / "cluster" / "prices.csv", usd_cny=7.1)


def estimate(profile, prices=PRICES) -> float:
    return make_plan(EPISODE, profile, calibration=CAL, prices=prices, script_sha256="0" * 64).estimated_cost_yuan


@pytest.mark.parametrize("profile", ["standard", str(REPO / "examples" / "profiles" / "naive_gpu.toml")])
def test_proposal_fits_and_every_step_is_cheaper(profile):
    given = resolve_profile(profile)
    budget = estimate(given) * 0.3
    prop = fit_budget(EPISODE, given, budget, calibration=CAL, prices=PRICES, allow_spot=False, script_sha256="0" * 64)
    assert prop.fits and prop.estimate_yuan <= budget
    costs = [yuan for _, yuan in prop.steps]
    assert costs == sorted(costs, reverse=True) and costs[0] == pytest.approx(estimate(given))
    assert prop.estimate_yuan == pytest.approx(estimate(prop.profile, PRICES.with_tier(prop.tier)))


def test_a_budget_nothing_reaches_is_reported_not_faked():
    prop = fit_budget(EPISODE, resolve_profile("standard"), 1e-9, calibration=CAL, prices=PRICES, allow_spot=True,
                      script_sha256="0" * 64)
    assert not prop.fits and prop.estimate_yuan > 1e-9
    assert prop.profile.short_side == 360  # it went down the whole ladder


def test_spot_is_only_used_when_allowed():
    naive = resolve_profile(str(REPO / "examples" / "profiles" / "naive_gpu.toml"))
    on_demand = fit_budget(EPISODE, naive, 1e6, calibration=CAL, prices=PRICES, allow_spot=False, script_sha256="0")
    spot = fit_budget(EPISODE, naive, 1e6, calibration=CAL, prices=PRICES, allow_spot=True, script_sha256="0")
    assert on_demand.tier == "on-demand" and spot.tier == "spot"
    assert spot.estimate_yuan < on_demand.estimate_yuan
