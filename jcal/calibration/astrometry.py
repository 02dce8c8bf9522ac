"""The astrometric fit: association in, fitted pixel->sky model and stars out.

Residual of measurement i (star s seen at pixel (x, y) in visit v at epoch t):

    r_i = W_i · (model_v,d(x, y) - star_s(t)), both in the tangent plane of visit v

the offset [deg] of the model's position from the star's in the visit's tangent plane (as
jointcal does; for `TangentPlaneAstrometry` forms, i.e. all of jcal's: the star's direction
is projected there, so nothing trigonometric is differentiated), whitened by W_i (the
centroid covariance carried to that plane through the model's pixel Jacobian, plus an
optional pedestal). Other forms are compared in the plane tangent at the star, through
(ra, dec). The error model is refreshed between stages and held fixed during a stage, so each
step solves a fixed weighted least-squares problem. A reference star adds (position at the
catalog epoch - catalog position) / error, and (proper motion - catalog proper motion) /
error when both exist.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from dataclasses import dataclass, field

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import jcal_models as jm
from jcal_models import MAS, Stars, sky_to_tangent

from ..associate import _ARCSEC, Association, _match_references, associate
from ..sky import unit_vectors
from ..config import FitConfig
from ..data import InputData, InputError
from ..jax_setup import ensure_configured
from ..solver import FitState, SingularSystemError, Solver, StructuredProblem, implicit_function, small_linalg
from ..solution import AstrometricSolution
from ..solver.compile import brief_jit
from ..solver.gauss_newton import unflatten_stars
from .initialise import initial_astrometric_model

log = logging.getLogger("jcal.calibration.astrometry")


def _in_tangent_plane(model) -> bool:
    return getattr(model, "compares_in_tangent_plane", False)


def astrometric_residual(model, star, m):
    """Whitened 2-d residual of one measurement (see module docstring)."""
    if _in_tangent_plane(model):
        xi, eta = model.tangent(m["x"], m["y"])
        xi_s, eta_s = model.project(star.direction(m["epoch"]))
        return m["whiten"] @ jnp.stack([xi - xi_s, eta - eta_s])
    xi, eta = sky_to_tangent(*model(m["x"], m["y"]), *star.position(m["epoch"]))
    return m["whiten"] @ jnp.stack([xi, eta])


def reference_residual(star, ref):
    """Whitened reference-catalog constraint of one star (zeros where there is none)."""
    xi, eta = jm.project(star.direction(ref["epoch"]), jm.tangent_basis(ref["ra"], ref["dec"]))
    position = jnp.stack([xi, eta]) / ref["position_err"] * ref["has_ref"]
    if star.pm is None:
        return position
    motion = (star.pm - ref["pm"]) / ref["pm_err"] * ref["has_pm"]
    return jnp.concatenate([position, motion])


@brief_jit
def _whitening(model, index, x, y, x_err, y_err, pedestal_deg):
    """(n, 2, 2) W with W^T W = inverse covariance of each centroid, in the plane of its residual."""

    def one(idx, xi, yi, sx, sy):
        view = jm.gather(model, idx)
        if _in_tangent_plane(view):
            plane = lambda p: jnp.stack(view.tangent(p[0], p[1]))  # noqa: E731
        else:
            ra0, dec0 = view(xi, yi)
            plane = lambda p: jnp.stack(sky_to_tangent(*view(p[0], p[1]), ra0, dec0))  # noqa: E731
        jac = jax.jacfwd(plane)(jnp.stack([xi, yi]))  # (2, 2): d(xi, eta) / d(x, y)
        cov = jac @ jnp.diag(jnp.stack([sx**2, sy**2])) @ jac.T + pedestal_deg**2 * jnp.eye(2)
        return small_linalg.solve_lower(small_linalg.cholesky(cov), jnp.eye(2))  # L^-1

    return jax.vmap(one)(index, x, y, x_err, y_err)


@dataclass
class AstrometryFit:
    """Everything the astrometric fit produced; see `jcal.FitResult` for the user-facing view."""

    model: jm.Transform  # fitted pixel -> sky model (full, with group axes)
    stars: Stars
    association: Association
    solver: Solver
    state: FitState
    mapping_mask: jax.Array
    star_mask: np.ndarray
    index: dict[str, np.ndarray]
    chi2: float
    ndof: int
    stage_seconds: dict[str, float] = field(default_factory=dict)
    # validation: (m,) bool measurements held out of the fit, and their chi2 (stars refitted alone on
    # the final mapping); None when nothing was held out
    held_out: np.ndarray | None = None
    held_out_chi2: np.ndarray | None = None

    @property
    def weights(self) -> np.ndarray:
        """(n,) 1 for measurements used, 0 for rejected outliers and held-out ones (association order)."""
        return self.state.weights[: self.solver.n_real]

    @property
    def rejected(self) -> np.ndarray:
        """(n,) True for measurements rejected as outliers (held-out ones are not)."""
        out = self.weights == 0
        return out if self.held_out is None else out & ~self.held_out

    def chi2_per_measurement(self) -> np.ndarray:
        return self.solver.chi2(self.state)[0]

    def deleted_chi2_per_measurement(self) -> np.ndarray:
        """(n,) chi2 of each measurement had its star been fitted without it: its expectation is 2
        per measurement when the errors are right, as chi2/ndof's is 1 (0: nothing else constrains
        the star, untestable)."""
        return self.solver.deleted_chi2(self.state, self.star_mask)

    def star_errors(self) -> dict[str, np.ndarray]:
        """1-sigma errors of the fitted stars (mas, mas/yr), mapping held fixed."""
        cov = self.solver.star_covariance(self.state, self.star_mask)
        sd = np.sqrt(np.maximum(np.diagonal(cov, axis1=1, axis2=2), 0)) / MAS
        names = ["ra", "dec", "pm_ra", "pm_dec"][: sd.shape[1]]
        return {name: sd[:, i] for i, name in enumerate(names)}

    def differentiable(self):
        """`solution(measurements, references) -> (mapping (N,), stars (S, q))`: the converged
        parameters as a JAX function of the inputs (implicit-function gradients), see
        `jcal.solver.implicit_function`. Build models from them with `model_from`/`stars_from`."""
        return implicit_function(self.solver, self.state, self.mapping_mask, self.star_mask)

    def model_from(self, flat_mapping: jax.Array) -> jm.Transform:
        """The fitted model with its fitted parameters replaced by `flat_mapping` (N,)."""
        pm, sm = eqx.partition(self.model, self.solver.mapping_filter)
        return eqx.combine(self.solver.layout.unflatten(flat_mapping, pm), sm)

    def stars_from(self, flat_stars: jax.Array) -> Stars:
        """The fitted stars with their parameters replaced by `flat_stars` (S, q)."""
        ps, ss = eqx.partition(self.stars, self.solver.star_filter)
        return eqx.combine(unflatten_stars(flat_stars, ps), ss)

    def mapping_covariance(self) -> np.ndarray:
        """(N, N) covariance of the mapping parameters, marginalised over the stars."""
        return self.solver.covariance(self.state, self.mapping_mask, self.star_mask)


def _proper_motion_wanted(data: InputData, assoc: Association, config: FitConfig) -> bool:
    if config.proper_motion != "auto":
        return config.proper_motion == "on"
    epochs = data.visits.epoch[np.isin(data.visits.visit, assoc.visits)]
    return float(np.ptp(epochs)) > config.pm_min_baseline_years


def _reference_data(data: InputData, assoc: Association, config: FitConfig, epoch0: float):
    ref = data.refcat
    has = assoc.star_ref >= 0
    r = np.where(has, assoc.star_ref, 0)
    err_ra = config.reference_error_mas if config.reference_error_mas is not None else ref.ra_err[r]
    err_dec = config.reference_error_mas if config.reference_error_mas is not None else ref.dec_err[r]
    n = len(has)
    has_pm = has & ref.has_proper_motion[r]
    # the prior of stars without a catalog proper motion is centred on the matched reference stars'
    # median motion: centred on 0, it biases every faint star the same way (the survey's mean motion),
    # and with them each visit's mapping by (epoch - mean epoch) x that bias
    centre = [float(np.median(ref.pmra[r][has_pm])), float(np.median(ref.pmdec[r][has_pm]))] if has_pm.any() \
        else [0.0, 0.0]
    star_data = {
        "ra": np.where(has, ref.ra[r], assoc.star_ra),
        "dec": np.where(has, ref.dec[r], assoc.star_dec),
        "epoch": np.where(has, ref.epoch[r], epoch0),
        "position_err": np.stack([np.broadcast_to(err_ra, n), np.broadcast_to(err_dec, n)], 1) * MAS,
        "has_ref": has.astype(float),
        "pm": np.stack([np.where(has_pm, ref.pmra[r], centre[0]), np.where(has_pm, ref.pmdec[r], centre[1])],
                       1) * MAS,
        # stars without a catalog proper motion get a broad prior (around `centre`): a star seen at two
        # epochs then still constrains the mapping, with its motion's uncertainty accounted for
        "pm_err": np.stack([np.where(has_pm, ref.pmra_err[r], config.pm_prior_mas_yr),
                            np.where(has_pm, ref.pmdec_err[r], config.pm_prior_mas_yr)], 1) * MAS,
        "has_pm": np.ones(n),
    }
    if not np.all(np.isfinite(star_data["position_err"][has])):
        raise InputError("refcat: matched reference stars have no position errors; set "
                         "config.reference_error_mas")
    return star_data, has, has_pm


def _initial_stars(data: InputData, assoc: Association, epoch0: float, proper_motion: bool) -> Stars:
    """Start matched stars at their reference position (carried to epoch0), others at the mean."""
    ra = np.where(np.isfinite(assoc.star_ref_ra), assoc.star_ref_ra, assoc.star_ra)
    dec = np.where(np.isfinite(assoc.star_ref_dec), assoc.star_ref_dec, assoc.star_dec)
    return Stars.at(ra, dec, np.full(len(ra), epoch0), proper_motion)


# The stages before the joint fit prepare its start, not its result: their chi2 tolerance is
# this many times looser. At the default 1e-6 the mapping-only stage stopped at a second step
# that gained 7e-5 (medium), which the joint fit redoes anyway.
WARM_UP_LOOSENING = 100.0


def fit_astrometry(data: InputData, assoc: Association, config: FitConfig, *, model: jm.Transform | None = None,
                   mapping_filter=None, progress=None) -> AstrometryFit:
    """Staged Gauss-Newton fit with outlier rejection (jointcal's recipe, vectorised)."""
    ensure_configured()  # 64-bit floats, before any array is made
    t_start = time.perf_counter()
    visit_epoch = dict(zip(data.visits.visit.tolist(), data.visits.epoch.tolist()))
    src = data.sources
    rows = assoc.source_index
    epoch = np.array([visit_epoch[v] for v in assoc.visits])[assoc.visit_index]
    epoch0 = float(np.round(np.mean(epoch), 3))
    proper_motion = _proper_motion_wanted(data, assoc, config)
    user_model = model is not None
    if model is None:
        model = initial_astrometric_model(data, assoc, config)
    stars = _initial_stars(data, assoc, epoch0, proper_motion)
    star_data, has_ref, has_pm = _reference_data(data, assoc, config, epoch0)

    index = {"star": assoc.star, "visit": assoc.visit_index, "detector": assoc.detector_index,
             "ccd_visit": assoc.ccd_visit_index}
    mdata = {"x": src.x[rows], "y": src.y[rows], "epoch": epoch, "whiten": np.zeros((len(rows), 2, 2))}
    star_xyz = unit_vectors(assoc.star_ra, assoc.star_dec)
    prior_dof = 2 * has_ref + (2 if proper_motion else 0)
    problem = StructuredProblem(astrometric_residual, reference_residual, model, stars, mdata, star_data, index,
                                star_xyz, prior_dof=prior_dof.astype(float), prior_rejectable=has_ref,
                                mapping_filter=mapping_filter)
    solver = Solver(problem)
    log.info("astrometry: %d measurements, %d stars (%d with reference), %d mapping + %d star parameters",
             solver.n_measurements, solver.n_stars, has_ref.sum(), solver.sizes["mapping_parameters"],
             solver.sizes["star_parameters"])

    # masks: gauge (model-specific) and per-star proper-motion freedom
    pm_params, _ = eqx.partition(model, solver.mapping_filter)
    ones = jax.tree.map(jnp.ones_like, pm_params)
    mapping_mask = solver.mapping_mask(model.fix_gauge(ones))
    star_mask = np.ones((solver.stars_real, 4 if proper_motion else 2))

    held_star = holdout_stars(assoc, has_ref, config.holdout_fraction)
    held = held_star[assoc.star]
    state = solver.new_state(model, stars, (~held).astype(float),
                             np.maximum(has_ref, proper_motion) * ~held_star)  # held out: never in the fit
    stage_seconds: dict[str, float] = {}

    whitened_for = [None]  # the mapping the current whitening was computed with

    def refresh_errors():
        if state.mapping is whitened_for[0]:  # e.g. stars-only stages: the mapping has not moved
            return
        whitened_for[0] = state.mapping
        ped = config.astrometry_pedestal_mas * MAS
        idx = {k: jnp.asarray(v) for k, v in index.items() if k != "star"}
        w = _whitening(state.mapping, idx, jnp.asarray(mdata["x"]), jnp.asarray(mdata["y"]),
                       jnp.asarray(src.x_err[rows]), jnp.asarray(src.y_err[rows]), ped)
        solver.set_data("whiten", np.asarray(w))

    def stage(name, fit_mapping, fit_stars, mmask, only_reference=False, tolerance=config.tolerance):
        t0 = time.perf_counter()
        refresh_errors()
        saved = state.weights
        reference_only = saved * solver.pad_measurements(has_ref[assoc.star])
        run = functools.partial(solver.run_stage, name=name, fit_mapping=fit_mapping, fit_stars=fit_stars,
                                mapping_mask=mmask, star_mask=star_mask, max_iterations=config.max_iterations,
                                tolerance=tolerance, line_search=config.line_search)
        if only_reference and _references_constrain_every_group(solver, index, reference_only[: solver.n_real]):
            # early stages anchor the mapping on reference stars alone (their positions are
            # known); where they leave some parameter free, every measurement is used instead
            state.weights = reference_only
            try:
                new = run(state)
            except SingularSystemError:
                log.info("astrometry %s: reference stars alone leave the mapping degenerate; using all", name)
                state.weights = saved
                new = run(state)
        else:
            new = run(state)
        new.weights = saved
        stage_seconds[name] = stage_seconds.get(name, 0.0) + time.perf_counter() - t0
        if progress:
            progress(f"astrometry {name}", new.history[-1]["chi2"] if new.history else float("nan"))
        return new

    # a form whose added terms need the base map settled first says so (`first_stage`)
    first_stage = model.first_stage(ones)
    # the stages before the joint one only prepare its start: converged 100x more loosely
    warm_up = WARM_UP_LOOSENING * config.tolerance
    if first_stage is not None:  # e.g. visit terms only, detectors held
        state = stage("visits", True, False, mapping_mask * solver.mapping_mask(first_stage), True,
                      tolerance=warm_up)
    state = stage("mappings", True, False, mapping_mask, True, tolerance=warm_up)
    state = stage("stars", False, True, mapping_mask, tolerance=warm_up)

    def refit(current: FitState, name: str, fit_mapping: bool) -> FitState:
        nonlocal state
        state = current
        state = stage(name, fit_mapping, True, mapping_mask)
        return state

    state = solver.reject_gross(state, lambda st: refit(st, "stars", False), lambda st: star_mask,
                                n_sigma=config.outlier_sigma, min_measurements=config.min_measurements,
                                max_rounds=config.max_outlier_rounds, label="astrometry")
    state = stage("all", True, True, mapping_mask)

    state = solver.reject_until_clean(
        state, lambda st: refit(st, "all", True), lambda st: refit(st, "stars", False),
        lambda st: star_mask, n_sigma=config.outlier_sigma, min_measurements=config.min_measurements,
        max_rounds=config.max_outlier_rounds, label="astrometry")
    held_chi2 = None
    if held.any():
        t0 = time.perf_counter()
        state, held_chi2 = _fit_held_out(solver, state, held, held_star, proper_motion, star_mask, config)
        stage_seconds["held_out"] = time.perf_counter() - t0
    c_m, c_s = solver.chi2(state)
    ndof = solver.ndof(state, mapping_mask, star_mask)
    stage_seconds["total"] = time.perf_counter() - t_start
    fit = AstrometryFit(state.mapping, solver.real_stars(state.stars), assoc, solver, state, mapping_mask, star_mask,
                        index, float(c_m.sum() + c_s.sum()), ndof, stage_seconds, held if held.any() else None,
                        held_chi2)
    if not user_model and config.rematch_rounds > 0:
        gain = missed_reference_matches(data, fit, config)
        if gain > REMATCH_GAIN * max(int(has_ref.sum()), 1):  # bounded: one round fewer each time
            log.info("astrometry: the fitted stars match %d more reference stars: associating again through "
                     "the fitted map and refitting", gain)
            new = associate(data, config, project=fitted_projector(data, fit))
            again = fit_astrometry(data, new, config.replace(rematch_rounds=config.rematch_rounds - 1),
                                   mapping_filter=mapping_filter, progress=progress)
            again.stage_seconds["before_rematch"] = time.perf_counter() - t_start - again.stage_seconds["total"]
            again.stage_seconds["total"] = time.perf_counter() - t_start
            return again
    return fit


REMATCH_GAIN = 0.01  # re-associate when the fitted stars would match this fraction more reference stars


def missed_reference_matches(data: InputData, fit: "AstrometryFit", config: FitConfig) -> int:
    """How many more of the fitted stars (at their fitted positions) match a reference star than the
    association matched: a first guess too poor for matching shows here."""
    assoc = fit.association
    pos = jax.vmap(lambda s, t: s.position(t))(fit.stars, jnp.asarray(assoc.star_epoch))
    xyz = unit_vectors(np.asarray(pos[0]), np.asarray(pos[1]))
    ref = data.refcat
    star_ref, _ = _match_references(xyz, assoc.star_epoch, unit_vectors(ref.ra, ref.dec), ref.epoch, ref.pmra,
                                    ref.pmdec, config.ref_match_radius_arcsec * _ARCSEC)
    return int(np.sum(star_ref >= 0) - np.sum(assoc.star_ref >= 0))


def fitted_projector(data: InputData, fit: "AstrometryFit"):
    """`jcal.associate`'s `project`: sky positions through the fitted map where it has one, else
    through the first-guess WCS (corrected by the association's alignment)."""
    a = fit.association
    solution = AstrometricSolution(fit.model, a.visits, a.detectors, a.ccd_visits)
    fitted = {tuple(k) for k in solution.ccd_visits.tolist()}
    alignment = a.alignment

    def project(rows, visit, detector):
        ra, dec = np.full(rows.size, np.nan), np.full(rows.size, np.nan)
        on = np.array([(v, d) in fitted for v, d in zip(visit.tolist(), detector.tolist())], bool)
        if on.any():
            ra[on], dec[on] = solution.pixel_to_sky(visit[on], detector[on], data.sources.x[rows[on]],
                                                    data.sources.y[rows[on]])
        for v, d in {(int(v), int(d)) for v, d in zip(visit[~on], detector[~on])}:
            sel = np.flatnonzero(~on & (visit == v) & (detector == d))
            ra[sel], dec[sel] = data.ccd_visits[(v, d)].wcs.all_pix2world(data.sources.x[rows[sel]],
                                                                          data.sources.y[rows[sel]], 0)
            if alignment is not None:
                ra[sel], dec[sel] = alignment.apply_one(v, d, ra[sel], dec[sel])
        return ra, dec

    return project


HOLDOUT_MIN_MEASUREMENTS = 3  # a held-out star needs this many detections (its own fit leaves residuals)


def holdout_stars(assoc: Association, has_ref: np.ndarray, fraction: float) -> np.ndarray:
    """(S,) bool: a reproducible `fraction` of the stars without a reference star and with at least
    HOLDOUT_MIN_MEASUREMENTS detections, held out of the fit to validate it."""
    held = np.zeros(assoc.n_stars, bool)
    eligible = np.flatnonzero(~has_ref & (np.bincount(assoc.star, minlength=assoc.n_stars)
                                          >= HOLDOUT_MIN_MEASUREMENTS))
    n = int(round(fraction * eligible.size))
    if n:
        held[np.random.default_rng(20140).choice(eligible, n, replace=False)] = True
    return held


def _fit_held_out(solver: Solver, state: FitState, held: np.ndarray, held_star: np.ndarray, proper_motion: bool,
                  star_mask: np.ndarray, config: FitConfig) -> tuple[FitState, np.ndarray]:
    """Fit the held-out stars alone on the final mapping; returns the state (held-out measurements
    still out of chi2 and ndof) and the (m,) chi2 of every measurement as the held-out stars see it."""
    trial = dataclasses.replace(state, weights=solver.pad_measurements(held.astype(float)),
                                star_weights=solver.pad_stars(held_star * float(proper_motion)), unusable=None,
                                history=list(state.history))
    trial = solver.run_stage(trial, "held_out", fit_mapping=False, fit_stars=True,
                             mapping_mask=np.zeros(solver.layout.size), star_mask=star_mask,
                             max_iterations=config.max_iterations, tolerance=config.tolerance,
                             line_search=config.line_search)
    chi2 = solver.chi2(trial)[0]
    return dataclasses.replace(state, stars=trial.stars), np.where(held, chi2, np.nan)


def _references_constrain_every_group(solver: Solver, index, weights) -> bool:
    """True if, with only reference-matched measurements, every mapping group keeps at least as
    many residuals as it has parameters (else the early stages use every measurement)."""
    for key, n_groups, p in zip(solver.layout.keys, solver.layout.n_groups, solver.layout.row_sizes):
        counts = np.bincount(index[key], weights=weights, minlength=n_groups) if key in index else [weights.sum()]
        if np.min(counts) * 2 < 2 * p:
            return False
    return True
