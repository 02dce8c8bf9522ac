# %% [markdown]
# # Swapping astrometric model forms
# Start every form from the same first-guess constrained model and compare chi2 and residuals.

# %%
import numpy as np
import jcal
from jcal.associate import associate
from jcal.calibration.initialise import initial_astrometric_model
from jcal_models import extra

jcal.configure()  # JAX set up for jcal (64-bit floats, ...) before any computation

sim = jcal.simulate("tiny", seed=2)
config = jcal.FitConfig(visit_order=3, photometry=False)
init = initial_astrometric_model(sim.data, associate(sim.data, config), config)
forms = {"constrained": init, "radial": extra.radial_astrometry(init),
         "pixel_grid": extra.pixel_grid_astrometry(init)}

# %%
for name, form in forms.items():
    r = jcal.fit(sim.data, config, astrometry_model=form)
    t = r.measurement_table()
    good = ~t["outlier"]
    rms = np.sqrt(np.mean(np.r_[t["residual_ra_mas"][good], t["residual_dec_mas"][good]] ** 2))
    print(f"{name:12s} chi2/ndof={r.metrics['astrometry_chi2_per_ndof']:.3f} rms={rms:.2f} mas")
