"""The astrometric problem: residuals, their error model, and the set-up that turns an association
into a `StructuredProblem`.

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

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

import jcal_models as jm
from jcal_models import sky_to_tangent

from ..associate import Association
from ..config import FitConfig
from ..data import InputData
from ..sky import unit_vectors
from ..solver import StructuredProblem, small_linalg
from ..solver.compile import brief_jit
from .astrometry_setup import initial_stars, proper_motion_wanted, reference_constraints
from .initialise import initial_astrometric_model


def astrometric_residual(model, star, m):
    """Whitened 2-d residual of one measurement (see module docstring)."""
    if model.compares_in_tangent_plane:
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
def whitening(model, index, x, y, x_err, y_err, pedestal_deg):
    """(n, 2, 2) W with W^T W = inverse covariance of each centroid, in the plane of its residual."""

    def one(idx, xi, yi, sx, sy):
        view = jm.gather(model, idx)
        if view.compares_in_tangent_plane:
            plane = lambda p: jnp.stack(view.tangent(p[0], p[1]))  # noqa: E731
        else:
            ra0, dec0 = view(xi, yi)
            plane = lambda p: jnp.stack(sky_to_tangent(*view(p[0], p[1]), ra0, dec0))  # noqa: E731
        jac = jax.jacfwd(plane)(jnp.stack([xi, yi]))  # (2, 2): d(xi, eta) / d(x, y)
        cov = jac @ jnp.diag(jnp.stack([sx**2, sy**2])) @ jac.T + pedestal_deg**2 * jnp.eye(2)
        return small_linalg.solve_lower(small_linalg.cholesky(cov), jnp.eye(2))  # L^-1

    return jax.vmap(one)(index, x, y, x_err, y_err)


@dataclass
class AstrometryProblem:
    """The astrometric fit's problem, and what the recipe needs beside it (association order)."""

    problem: StructuredProblem
    has_reference: np.ndarray  # (S,) bool: matched to a reference star
    proper_motion: bool  # whether stars have a proper motion

    @property
    def model(self) -> jm.Transform:
        return self.problem.mapping


def astrometry_problem(data: InputData, assoc: Association, config: FitConfig, model=None,
                       mapping_filter=None) -> AstrometryProblem:
    """The astrometric problem of `assoc`: residuals of every measurement against its star at the
    visit's epoch, reference constraints, the starting model (default: from the first-guess WCS)
    and stars (matched ones at their reference position)."""
    visit_epoch = dict(zip(data.visits.visit.tolist(), data.visits.epoch.tolist()))
    src, rows = data.sources, assoc.source_index
    epoch = np.array([visit_epoch[v] for v in assoc.visits])[assoc.visit_index]
    epoch0 = float(np.round(np.mean(epoch), 3))
    proper_motion = proper_motion_wanted(data, assoc, config)
    if model is None:
        model = initial_astrometric_model(data, assoc, config)
    stars = initial_stars(data, assoc, epoch0, proper_motion)
    star_data, has_ref, _ = reference_constraints(data, assoc, config, epoch0)
    index = {"star": assoc.star, "visit": assoc.visit_index, "detector": assoc.detector_index,
             "ccd_visit": assoc.ccd_visit_index}
    mdata = {"x": src.x[rows], "y": src.y[rows], "epoch": epoch, "whiten": np.zeros((len(rows), 2, 2))}
    prior_dof = 2 * has_ref + (2 if proper_motion else 0)
    problem = StructuredProblem(astrometric_residual, reference_residual, model, stars, mdata, star_data, index,
                                unit_vectors(assoc.star_ra, assoc.star_dec), prior_dof=prior_dof.astype(float),
                                prior_rejectable=has_ref, mapping_filter=mapping_filter)
    return AstrometryProblem(problem, has_ref, proper_motion)
