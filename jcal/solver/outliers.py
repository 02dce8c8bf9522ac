"""The outlier policy: which measurements and reference terms leave the fit, and which come back.

Terms are scored by their leave-one-out chi2 (`normal_equations.leave_one_out_chi2`) against the
chi2 quantile of the two-sided Gaussian tail of n_sigma, scaled by a robust estimate of how much
the errors are underestimated (the median deleted chi2 over its expected median, when above 1):
the outliers themselves do not inflate the cut. Every function takes a state and returns a new one.

- `reject`: one round, the worst term per star beyond the cut (stars interact only through the
  mapping), peeling further terms of the same stars in rounds that reject few (`peeling.peel`).
- `reject_gross`: rounds at a wide cut with stars-only refits, before the first joint step.
- `reject_until_clean`: rounds with refits until a full refit leaves nothing to reject, with one
  re-admission (`readmit`) of rejected terms that fit the clean solution.
The choices and their measured effect are described in docs/solver.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import special, stats

from .layout import rank_in_groups
from .peeling import StarTerms, peel as peel_stars
from .problem import FitState
from .programs import host_rows

if TYPE_CHECKING:
    from .gauss_newton import Solver

log = logging.getLogger("jcal.solver")

# Before the first joint step, measurements are rejected at GROSS_FACTOR times the n-sigma cut,
# reference terms at GROSS_REFERENCE_FACTOR times it (`reject_gross`).
GROSS_FACTOR = 3.0
GROSS_REFERENCE_FACTOR = 10.0
STARS_ONLY_BELOW = 1e-3  # outlier rounds rejecting fewer than this fraction of the terms refit only the stars

Refit = Callable[[FitState], FitState]


def few(n_rejected: int, state: FitState) -> bool:
    """A round rejecting at most `STARS_ONLY_BELOW` of the terms in use: the mapping is no
    longer biased by gross outliers (its stars alone are refitted, and peeled)."""
    return n_rejected <= STARS_ONLY_BELOW * float(np.sum(state.weights) + np.sum(state.star_weights))


def _tail_and_scale(n_sigma: float, d_m: np.ndarray, used: np.ndarray, dim: int) -> tuple[float, float]:
    """The Gaussian two-sided tail probability of n_sigma, and the robust error scale: the
    median leave-one-out chi2 of the used measurements over its expected median (>= 1)."""
    tail = float(special.erfc(n_sigma / np.sqrt(2.0)))
    if not used.any():
        return tail, 1.0
    return tail, max(float(np.median(d_m[used])) / stats.chi2.median(dim), 1.0)


def _prior_dof_levels(prior_dof: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct prior dof values (at least 1) and each star's position among them."""
    dof, which = np.unique(np.maximum(prior_dof, 1), return_inverse=True)
    return dof, which.ravel()


def reject(solver: "Solver", state: FitState, n_sigma: float, star_mask, min_measurements: int = 2,
           reference_sigma: float | None = None, judged: np.ndarray | None = None,
           peel: bool = True) -> tuple[FitState, int, int]:
    """One round: per star, the worst measurement or reference term beyond the n_sigma cut leaves.

    Args:
        star_mask: (S, q) free star parameters.
        min_measurements: a star left with fewer loses the rest too.
        reference_sigma: the cut of reference terms (default n_sigma).
        judged: (S,) bool, the stars whose terms are judged (default all).
        peel: in a round that rejects few terms, refit each star that lost one alone and reject
            again while a term is beyond the cut (saves a round per further term).
    Returns the new state and how many measurement and reference terms were rejected.
    """
    p = solver.prepared
    smask = p.effective_star_mask(state, star_mask)
    d_m, d_s, _ = solver.leave_one_out(state, smask)
    d_m, d_s = np.asarray(d_m), np.asarray(d_s)
    star = np.asarray(p.problem.index["star"])
    used = state.weights > 0
    tail, scale = _tail_and_scale(n_sigma, d_m, used, solver.residual_dim)
    cut_m = stats.chi2.isf(tail, solver.residual_dim) * scale
    judged = np.ones(p.n_stars, bool) if judged is None else np.asarray(judged, bool)
    score_m = np.where(used & judged[star], d_m / cut_m, 0.0)
    score_s, cut_s = np.zeros(p.n_stars), np.ones(p.n_stars)
    rejectable = np.ones(p.n_stars, bool) if p.problem.prior_rejectable is None \
        else np.asarray(p.problem.prior_rejectable, bool)  # a prior that is not data stays
    if p.problem.prior_dof is not None:
        dof, which = _prior_dof_levels(p.problem.prior_dof)
        reference_tail = tail if reference_sigma is None else float(special.erfc(reference_sigma / np.sqrt(2.0)))
        cut_s = stats.chi2.isf(reference_tail, dof)[which] * scale  # per distinct dof: isf is slow
        score_s = np.where((state.star_weights > 0) & rejectable & judged, d_s / cut_s, 0.0)
    worst = score_s.copy()
    np.maximum.at(worst, star, score_m)
    candidates = np.flatnonzero((score_m > 1) & (score_m >= worst[star]))
    _, first = np.unique(star[candidates], return_index=True)  # one per star
    reject_m = np.zeros(len(star), bool)
    reject_m[candidates[first]] = True
    has_rejected = np.zeros(p.n_stars, bool)
    has_rejected[star[reject_m]] = True
    reject_s = (score_s > 1) & (score_s >= worst) & ~has_rejected
    if peel and few(int(reject_m.sum() + reject_s.sum()), state):
        # few rejections: the mapping is clean, a star's other terms can be judged now
        _peel(solver, state, smask, reject_m, reject_s, cut_m, cut_s, rejectable, min_measurements)
    has_rejected[star[reject_m]] = True
    weights = np.where(reject_m, 0.0, state.weights)
    # a star left with too few measurements cannot tell which of them was wrong: drop it
    left = np.bincount(star, weights=weights, minlength=p.n_stars)
    orphaned = (left < min_measurements) & (left > 0) & has_rejected
    reject_m |= orphaned[star] & (weights > 0)
    state = state.replace(weights=np.where(reject_m, 0.0, state.weights),
                          star_weights=np.where(reject_s, 0.0, state.star_weights))
    return state, int(reject_m.sum()), int(reject_s.sum())


def _peel(solver: "Solver", state: FitState, smask, reject_m: np.ndarray, reject_s: np.ndarray, cut_m: float,
          cut_s: np.ndarray, rejectable: np.ndarray, min_measurements: int) -> None:
    """Extend this round's rejections (`reject_m`, `reject_s`, updated in place) by peeling
    the stars that lost a term (`peeling.peel`), from the terms the scoring linearised."""
    star = np.asarray(solver.problem.index["star"])
    hit = np.zeros(solver.n_stars, bool)
    hit[star[reject_m]] = True
    hit |= reject_s
    if not hit.any():
        return
    stars = np.flatnonzero(hit)
    rows = np.flatnonzero(hit[star] & (state.weights > 0))
    rows = rows[np.argsort(star[rows], kind="stable")]
    slot_star = np.searchsorted(stars, star[rows])
    counts = np.bincount(slot_star, minlength=len(stars))
    slot = rank_in_groups(counts)
    shape = (len(stars), int(counts.max()))

    terms = solver.linear_terms(state, False)  # the scoring's, at this state
    smask = np.asarray(smask)
    r_rows, j_rows = host_rows((terms.r, terms.js), rows)
    j_rows = j_rows * smask[star[rows]][:, None, :]
    r = np.zeros(shape + r_rows.shape[1:])
    j = np.zeros(shape + j_rows.shape[1:])
    alive = np.zeros(shape, bool)
    r[slot_star, slot], j[slot_star, slot], alive[slot_star, slot] = r_rows, j_rows, ~reject_m[rows]
    q = j.shape[-1]
    in_fit = state.star_weights[stars] > 0
    if terms.rp is not None:
        rp, jp = host_rows((terms.rp, terms.jp), stars)
        jp = jp * smask[stars][:, None, :]
    else:
        rp, jp = np.zeros((len(stars), 0)), np.zeros((len(stars), 0, q))
    prior_alive = in_fit & rejectable[stars] & ~reject_s[stars]
    alive_after, prior_after = peel_stars(StarTerms(r, j, alive, rp, jp, prior_alive, in_fit & ~rejectable[stars],
                                                    1.0 - smask[stars]), cut_m, cut_s[stars], min_measurements)
    reject_m[rows[alive[slot_star, slot] & ~alive_after[slot_star, slot]]] = True
    reject_s[stars[prior_alive & ~prior_after]] = True


def readmit(solver: "Solver", state: FitState, n_sigma: float, star_mask,
            eligible: np.ndarray) -> tuple[FitState, int]:
    """Give weight 1 back to `eligible` rejected measurements whose chi2 against the current fit
    (noise plus their star's uncertainty) is within the n_sigma cut of `reject` (same robust
    scale), where their star still has measurements in the fit. Returns the state and how many."""
    p = solver.prepared
    d_m, _, _ = solver.leave_one_out(state, p.effective_star_mask(state, star_mask))
    d_m = np.asarray(d_m)
    tail, scale = _tail_and_scale(n_sigma, d_m, state.weights > 0, solver.residual_dim)
    star = np.asarray(p.problem.index["star"])
    fitted = np.bincount(star, weights=state.weights, minlength=p.n_stars) > 0
    back = np.zeros(p.n_measurements, bool)
    back[: p.n_real] = eligible[: p.n_real] & fitted[star[: p.n_real]]
    back &= d_m < stats.chi2.isf(tail, solver.residual_dim) * scale
    return state.replace(weights=np.where(back, 1.0, state.weights)), int(back.sum())


def _counted(state: FitState, n_meas: int, n_ref: int) -> FitState:
    return state.replace(n_outliers=state.n_outliers + n_meas,
                         n_reference_outliers=state.n_reference_outliers + n_ref)


def reject_until_clean(solver: "Solver", state: FitState, refit_all: Refit, refit_stars: Refit,
                       star_mask: Callable[[FitState], Any], *, n_sigma: float, min_measurements: int,
                       max_rounds: int, label: str) -> FitState:
    """Outlier rounds (`reject`) with refits, until a full refit leaves nothing to reject.

    After a round that rejects many terms (gross outliers bias the mapping) everything is
    refitted; after one that rejects few (`few`) only the stars are: a few terms among the
    thousands behind each mapping group barely move it, while their stars move fully. Once a
    round finds nothing after a stars-only refit, everything is refitted and scored again, so
    the result is the joint optimum for its final outlier set. The first round that rejects few
    also re-admits rejected measurements that fit the solution (`readmit`), once.
    `refit_*` run a fitting stage; `star_mask(state)` is the star-parameter mask of `reject`.
    """
    fully_refit, readmitted = True, False
    # e.g. unusable fluxes: never outliers, never re-admitted
    outside_before = state.unusable if state.unusable is not None else state.weights == 0
    for _ in range(max_rounds):
        before = state.weights
        state, n_meas, n_ref = reject(solver, state, n_sigma, star_mask(state), min_measurements)
        state = _counted(state, n_meas, n_ref)
        log.info("%s: rejected %d measurement and %d reference outliers", label, n_meas, n_ref)
        n_back = 0
        if few(n_meas + n_ref, state) and not readmitted:
            # rejections are decided on fits still biased by the outliers not yet found; a
            # term that fits the clean solution comes back (not one this round rejected)
            readmitted = True
            state, n_back = readmit(solver, state, n_sigma, star_mask(state), (before == 0) & ~outside_before)
            state = _counted(state, -n_back, 0)
            if n_back:
                log.info("%s: re-admitted %d measurement(s) that fit the current solution", label, n_back)
        changed = n_meas + n_ref + n_back
        if changed == 0:
            if fully_refit:
                return state
            state, fully_refit = refit_all(state), True
            continue
        fully_refit = not few(changed, state)
        state = refit_all(state) if fully_refit else refit_stars(state)
    if max_rounds:
        log.warning("%s: outlier rejection still finding outliers after %d rounds", label, max_rounds)
        state = state.replace(converged=False)
    return state


def reject_gross(solver: "Solver", state: FitState, refit_stars: Refit, star_mask: Callable[[FitState], Any], *,
                 n_sigma: float, min_measurements: int, max_rounds: int, label: str) -> FitState:
    """Gross outliers out before the first joint step: rounds of `reject` with stars-only refits,
    while rounds reject many terms (`few`). The mapping was fitted on reference stars and the stars
    on their measurements: gross outliers stand out, but the mapping is not yet good enough to judge
    the rest, so the cut is `GROSS_FACTOR` times n_sigma for measurements and
    `GROSS_REFERENCE_FACTOR` times for reference terms (whose errors are tiny next to the mapping's
    errors before the joint fit). `reject_until_clean` follows at n_sigma.
    """
    star = np.asarray(solver.problem.index["star"])
    touched = np.zeros(solver.n_stars, bool)
    for _ in range(max_rounds):
        weights, star_weights = state.weights, state.star_weights
        # a star that lost a term here is judged again only while it keeps plenty: else a
        # second term beyond the cut more likely says the mapping is still off there, and
        # the joint rounds judge it
        in_use = np.bincount(star, weights=weights, minlength=solver.n_stars)
        judged = ~touched | (in_use > min_measurements + 1)
        state, n_meas, n_ref = reject(solver, state, GROSS_FACTOR * n_sigma, star_mask(state), min_measurements,
                                      reference_sigma=GROSS_REFERENCE_FACTOR * n_sigma, judged=judged, peel=False)
        state = _counted(state, n_meas, n_ref)
        log.info("%s: rejected %d measurement and %d reference gross outliers", label, n_meas, n_ref)
        if n_meas + n_ref == 0:
            break
        touched[star[state.weights < weights]] = True
        touched[state.star_weights < star_weights] = True
        state = refit_stars(state)
        if few(n_meas + n_ref, state):
            break
    return state
