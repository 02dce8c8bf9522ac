"""A saved model evaluated with numpy (no JAX) against the compiled JAX evaluation.

Fits the tiny survey with the constrained form and each form of `jcal_models.extra`, saves and
reloads it, and evaluates 100 random pixels per detector-visit both ways. Run:
    OPENBLAS_NUM_THREADS=1 python benchmarks/numpy_evaluation.py

Result (jax 0.10.2, numpy 2.4, CPU): every form, 1600 points, max |numpy - jax| = 2.8e-14 deg in
ra (one float64 ulp at ra ~ 200 deg) and 8.9e-16 deg in dec.
"""

import numpy as np, jcal, tempfile, pathlib
jcal.configure()
from jcal.associate import associate
from jcal.calibration.initialise import initial_astrometric_model
from jcal_models import extra
sim = jcal.simulate("tiny", seed=5)
cfg = jcal.FitConfig(visit_order=3, photometry=False)
init = initial_astrometric_model(sim.data, associate(sim.data, cfg), cfg)
for name, f in [("constrained", lambda m: m), ("radial", extra.radial_astrometry), ("pixel_grid", extra.pixel_grid_astrometry), ("turbulent", extra.turbulent_astrometry)]:
    r = jcal.fit(sim.data, cfg, astrometry_model=f(init))
    d = pathlib.Path(tempfile.mkdtemp()); jcal.save_model(r, d / "model"); s = jcal.load_model(d / "model")
    v, det = r.association.ccd_visits.T
    v, det = np.repeat(v, 100), np.repeat(det, 100)
    rng = np.random.default_rng(0); x, y = rng.uniform(0, 1024, v.size), rng.uniform(0, 1024, v.size)
    a = s.pixel_to_sky(v, det, x, y); b = s.pixel_to_sky(v, det, x, y, xp=np)
    print(name, "points", v.size, "max |numpy - jax| deg: ra %.2e dec %.2e" % (np.abs(a[0]-b[0]).max(), np.abs(a[1]-b[1]).max()))
