"""The fit recipe (jcal.calibration.recipe): declared steps over an immutable state, and results that
are plain data."""

import dataclasses

import numpy as np
import pytest

import jcal
from jcal.calibration import astrometry
from jcal.calibration.recipe import Fit, FitHeldOut, RejectUntilClean, Step, run_recipe
from jcal.solver import FitState, Solver


@pytest.fixture(scope="module")
def tiny():
    sim = jcal.simulate("tiny", seed=3)
    config = jcal.FitConfig(visit_order=2, photometry=False, rematch_rounds=0)
    return sim, config, jcal.fit(sim.data, config)


def test_fit_state_cannot_be_changed_in_place(tiny):
    state = tiny[2].astrometry.state
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.weights = np.zeros(3)
    assert isinstance(state.history, tuple) and state.history


def test_results_hold_the_problem_not_a_solver(tiny):
    fit = tiny[2].astrometry
    assert not any(isinstance(v, Solver) for v in vars(fit).values())
    assert fit.sizes["measurements"] == len(fit.association.star)
    chi2 = fit.chi2_per_measurement()  # statistics on demand, from the prepared problem
    assert chi2.shape == fit.weights.shape and 0 < chi2.sum() < fit.chi2  # fit.chi2 adds the reference terms
    with pytest.warns(DeprecationWarning, match="fit.problem"):
        assert isinstance(fit.solver, Solver)


def test_compile_seconds_are_reported(tiny):
    seconds = tiny[2].metrics["astrometry_stage_seconds"]
    assert 0.0 <= seconds["compile"] <= seconds["total"]


def test_a_recipe_declared_by_hand_runs_step_by_step(tiny):
    """A researcher's own recipe: the astrometric set-up, fewer steps, and a step of their own."""
    sim, config, _ = tiny
    assoc = jcal.associate(sim.data, config)
    calibration, start = astrometry._calibration(sim.data, assoc, config, None, None, None)
    seen = []

    @dataclasses.dataclass(frozen=True)
    class Record(Step):
        def run(self, calibration, state):
            seen.append((len(state.history), int(np.sum(state.weights))))
            return state

    recipe = (Fit("mappings", mapping="free", anchored=True), Fit("no such mask", mapping="not_defined"),
              Record(), Fit("all", mapping="free", stars=True), RejectUntilClean(), FitHeldOut(), Record())
    state = run_recipe(recipe, calibration, start)
    assert isinstance(state, FitState) and state is not start
    assert start.history == () and np.array_equal(start.weights, calibration.solver.new_state(
        start.mapping, calibration.solver.real_stars(start.stars), start.weights[: assoc.n_measurements],
        start.star_weights[: assoc.n_stars]).weights)  # the starting state is untouched
    assert [h["stage"] for h in state.history][0] == "mappings"
    assert "no such mask" not in {h["stage"] for h in state.history}  # a mask the form lacks: skipped
    assert len(seen) == 2 and seen[1][0] > seen[0][0]
    assert state.held_out_chi2 is not None and np.isfinite(state.held_out_chi2).any()
    assert set(calibration.stage_seconds) >= {"mappings", "all", "held_out"}
