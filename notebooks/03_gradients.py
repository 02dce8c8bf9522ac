# %% [markdown]
# # Gradients and uncertainties
# jax.grad of a model form's sky position w.r.t. parameters and pixels; parameter covariance
# and the WCS uncertainty at a pixel (propagated with jax.jacobian).

# %%
import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import jcal
import jcal_models as jm

jcal.configure()  # JAX set up for jcal (64-bit floats, ...) before any computation

sim = jcal.simulate("tiny", seed=2)
result = jcal.fit(sim.data, jcal.FitConfig(visit_order=3, photometry=False))
fit = result.astrometry
model = fit.model
one = {"detector": 0, "visit": 0, "ccd_visit": 0}
view = jm.gather(model, one)

# %% gradient w.r.t. pixels
dra_dx = jax.grad(lambda x: view(x, 500.0)[0])(500.0)
print("d ra / d x [arcsec/pixel]:", float(dra_dx) * 3600)

# %% gradient w.r.t. parameters
params, static = eqx.partition(model, fit.mapping_filter)
g = jax.grad(lambda p: jm.gather(eqx.combine(p, static), one)(500.0, 500.0)[1])(params)
print("non-zero parameter derivatives:", sum(int(jnp.count_nonzero(a)) for a in jax.tree.leaves(g)))

# %% covariance and WCS uncertainty at a pixel
cov = fit.mapping_covariance()
flat, unravel = jax.flatten_util.ravel_pytree(params)
mask = np.asarray(jax.flatten_util.ravel_pytree(fit.mapping_mask)[0]) > 0 if cov.shape[0] != flat.size else np.ones(flat.size, bool)
print("covariance", cov.shape, "parameters", flat.size, "fitted", mask.sum())

def sky(p_flat):
    m = eqx.combine(unravel(p_flat), static)
    ra, dec = jm.gather(m, one)(500.0, 500.0)
    return jnp.stack([ra * jnp.cos(jnp.radians(dec)), dec]) * 3.6e6  # mas

jac = np.asarray(jax.jacobian(sky)(flat))[:, mask]
if cov.shape[0] == jac.shape[1]:
    wcs_cov = jac @ cov @ jac.T
    print("WCS 1-sigma at pixel (500, 500) [mas]:", np.sqrt(np.diag(wcs_cov)))

# %% [markdown]
# ## Gradients through the fit
# `fit.differentiable()` is the converged solution as a JAX function of the inputs. Its
# derivative comes from the implicit function theorem (one Schur solve in the backward pass),
# not from unrolling Gauss-Newton iterations: how does a star's fitted position move when one
# centroid moves?

# %%
solution = fit.differentiable()
x = jnp.asarray(np.asarray(fit.problem.data["x"])[: fit.problem.n_real])
y = jnp.asarray(np.asarray(fit.problem.data["y"])[: fit.problem.n_real])
star = int(fit.association.star[0])
grad_x = jax.grad(lambda x: solution({"x": x, "y": y}, {})[1][star, 0] * 3.6e6)(x)
own = np.flatnonzero(fit.association.star == star)
print("d(fitted xi of star) / d(x centroid) of its own measurements [mas/px]:", np.asarray(grad_x)[own])
print("largest influence elsewhere [mas/px]:", float(np.max(np.abs(np.delete(np.asarray(grad_x), own)))))
