"""Outlier peeling within one star, on the host: what successive stars-only rounds would do.

An outlier round rejects at most one term per star, because the terms of one star interact
through it: once the worst goes, the star moves and the others' scores change. A star with
several bad terms (a blend, a run of bad centroids) then costs one round each, and every
round is a linearisation, a scoring and a refit of all stars. Here the stars that lost a term
are refitted alone, in closed form with the mapping held (a star's fit is a small linear
least-squares problem), rescored with the same leave-one-out chi2 and cut, and peeled again,
until no term of theirs is beyond the cut. The mapping's refit is left to the next round, as
after any stars-only round.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class StarTerms(NamedTuple):
    """The terms of A stars, padded to K measurements each (all whitened and weighted)."""

    r: np.ndarray  # (A, K, d) measurement residuals
    j: np.ndarray  # (A, K, d, q) their star Jacobian blocks (fixed parameters masked)
    alive: np.ndarray  # (A, K) bool: measurement in the fit (False: padding or rejected)
    rp: np.ndarray  # (A, k) prior residuals (k = 0: no prior)
    jp: np.ndarray  # (A, k, q)
    prior_alive: np.ndarray  # (A,) bool: prior in the fit and rejectable
    prior_fixed: np.ndarray  # (A,) bool: prior in the fit, not rejectable
    fixed: np.ndarray  # (A, q) 1 for fixed star parameters (identity rows), else 0


def _deleted_chi2(r: np.ndarray, j: np.ndarray, h_inv: np.ndarray) -> np.ndarray:
    """r^T (I - J H^-1 J^T)^-1 r per term, 0 where the term is all its star has (leverage ~1),
    as `normal_equations.leave_one_out_chi2`. r (..., d), j (..., d, q), h_inv (..., q, q)."""
    d = r.shape[-1]
    m = np.eye(d) - j @ h_inv @ np.swapaxes(j, -1, -2)
    testable = np.linalg.eigvalsh(m)[..., 0] > 1e-6
    m = np.where(testable[..., None, None], m, np.eye(d))
    z = np.linalg.solve(m, r[..., None])[..., 0]
    return np.where(testable, np.sum(r * z, axis=-1), 0.0)


def peel(terms: StarTerms, cut_m: float, cut_p: np.ndarray, min_measurements: int,
         max_iterations: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Reject, star by star, the worst remaining term beyond its cut and refit, until none is.

    cut_m: chi2 cut of a measurement; cut_p (A,): of each star's prior. A star stops being
    peeled once it has fewer than `min_measurements` measurements (the caller drops the rest:
    such a star cannot tell which was wrong). Returns the final (A, K) measurement and (A,)
    prior alive masks.
    """
    alive, prior_alive = terms.alive.copy(), terms.prior_alive.copy()
    active = np.ones(len(alive), bool)  # stars still being peeled
    q = terms.j.shape[-1]
    eye = np.eye(q)
    for _ in range(max_iterations):
        active &= alive.sum(axis=1) >= min_measurements
        if not active.any():
            break
        a = np.flatnonzero(active)
        w = alive[a][..., None].astype(float)  # (a, K, 1)
        r, j = terms.r[a] * w, terms.j[a] * w[..., None]
        wp = (prior_alive[a] | terms.prior_fixed[a]).astype(float)[:, None]
        rp, jp = terms.rp[a] * wp, terms.jp[a] * wp[..., None]
        h = (np.einsum("akdp,akdq->apq", j, j) + np.einsum("adp,adq->apq", jp, jp)
             + terms.fixed[a][:, :, None] * eye)
        g = np.einsum("akdp,akd->ap", j, r) + np.einsum("adp,ad->ap", jp, rp)
        h_inv = np.linalg.inv(h)
        delta = -np.einsum("apq,aq->ap", h_inv, g)  # the star refitted on its remaining terms
        r_new = r + np.einsum("akdq,aq->akd", j, delta)
        score = np.where(alive[a], _deleted_chi2(r_new, j, h_inv[:, None]) / cut_m, 0.0)  # (a, K)
        score_p = np.zeros(len(a))
        if terms.rp.shape[1]:
            rp_new = rp + np.einsum("adq,aq->ad", jp, delta)
            score_p = np.where(prior_alive[a], _deleted_chi2(rp_new, jp, h_inv) / cut_p[a], 0.0)
        worst = np.argmax(score, axis=1)
        worst_score = score[np.arange(len(a)), worst]
        drop_m = (worst_score > 1) & (worst_score >= score_p)
        drop_p = (score_p > 1) & ~drop_m
        alive[a[drop_m], worst[drop_m]] = False
        prior_alive[a[drop_p]] = False
        active[a] = drop_m | drop_p
    return alive, prior_alive
