# %% [markdown]
# # jcal quickstart: simulate, fit, inspect
# A tiny simulated survey, a joint astrometric fit, its metrics and residuals.

# %%
import matplotlib.pyplot as plt
import numpy as np
import jcal

jcal.configure()  # JAX set up for jcal (64-bit floats, ...) before any computation

sim = jcal.simulate("tiny", seed=2)
result = jcal.fit(sim.data, jcal.FitConfig(visit_order=3, photometry=False))

# %%
m = result.metrics
print({k: m[k] for k in ("astrometry_chi2_per_ndof", "astrometry_iterations", "astrometry_outliers")})

# %%
meas = result.measurement_table()
good = ~meas["outlier"]
fig, ax = plt.subplots()
ax.scatter(meas["residual_ra_mas"][good], meas["residual_dec_mas"][good], s=2)
ax.set(xlabel="RA residual [mas]", ylabel="Dec residual [mas]", aspect="equal")
print("RMS [mas]:", np.sqrt(np.mean(meas["residual_ra_mas"][good] ** 2)))
