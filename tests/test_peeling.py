"""Peeling of a star's outliers within one round (jcal.solver.peeling)."""

import numpy as np
from scipy import stats

from jcal.solver.peeling import StarTerms, peel


def _star(offsets, prior=None, seed=0):
    """One star at 0 measured at `offsets` (+ unit noise) in 2-d: r_i = s - x_i, J_i = I."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(len(offsets), 2)) + np.asarray(offsets, float)[:, None]
    s = x.mean(axis=0)  # the star fitted on all measurements
    r = (s - x)[None]
    j = np.broadcast_to(np.eye(2), (1, len(offsets), 2, 2)).copy()
    if prior is None:
        rp, jp = np.zeros((1, 0)), np.zeros((1, 0, 2))
    else:
        rp, jp = (s - np.asarray(prior, float))[None], np.eye(2)[None]
    return r, j, rp, jp


CUT = stats.chi2.isf(5.7e-7, 2)  # 5 sigma, 2 dof


def test_peels_every_outlier_of_a_star_in_one_call():
    r, j, rp, jp = _star([0] * 8 + [40, -30])
    alive = np.ones((1, 10), bool)
    alive[0, 8] = False  # the round's first rejection (its worst term)
    terms = StarTerms(r, j, alive, rp, jp, np.zeros(1, bool), np.zeros(1, bool), np.zeros((1, 2)))
    after, _ = peel(terms, CUT, np.ones(1), min_measurements=2)
    assert after[0].tolist() == [True] * 8 + [False, False]


def test_keeps_a_clean_star_and_judges_the_reference_too():
    r, j, rp, jp = _star([0] * 6, prior=[0.0, 0.0])
    alive = np.ones((1, 6), bool)
    terms = StarTerms(r, j, alive, rp, jp, np.ones(1, bool), np.zeros(1, bool), np.zeros((1, 2)))
    after, prior_after = peel(terms, CUT, np.array([CUT]), min_measurements=2)
    assert after.all() and prior_after.all()

    r, j, rp, jp = _star([0] * 6 + [50], prior=[60.0, 0.0])  # a bad measurement and a bad reference
    alive = np.ones((1, 7), bool)
    alive[0, 6] = False
    terms = StarTerms(r, j, alive, rp, jp, np.ones(1, bool), np.zeros(1, bool), np.zeros((1, 2)))
    after, prior_after = peel(terms, CUT, np.array([CUT]), min_measurements=2)
    assert after[0, :6].all() and not prior_after[0]

    terms = terms._replace(prior_alive=np.zeros(1, bool), prior_fixed=np.ones(1, bool))  # not rejectable
    after, prior_after = peel(terms, CUT, np.array([CUT]), min_measurements=2)
    assert not prior_after[0]  # never was a candidate: stays as it is (held)


def test_stops_below_min_measurements():
    r, j, rp, jp = _star([0, 30, -40])
    alive = np.array([[True, False, True]])
    terms = StarTerms(r, j, alive, rp, jp, np.zeros(1, bool), np.zeros(1, bool), np.zeros((1, 2)))
    after, _ = peel(terms, CUT, np.ones(1), min_measurements=3)
    assert after.tolist() == alive.tolist()  # the caller drops such a star: nothing left to judge
