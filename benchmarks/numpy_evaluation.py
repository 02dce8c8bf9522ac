"""A saved model evaluated with numpy (no JAX) against the compiled JAX evaluation.

Fits the tiny survey with the constrained form and each form of `jcal_models.extra`, saves and
reloads it, and evaluates 100 random pixels per detector-visit both ways. Run:
    OPENBLAS_NUM_THREADS=1 python benchmarks/numpy_evaluation.py

Result (jax 0.10.2, numpy 2.4, CPU): every form, 1600 points, max |numpy - jax| = 2.8e-14 deg in
ra (one float64 ulp at ra ~ 200 deg) and 8.9e-16 deg in dec.
"""

import tempfile
from pathlib import Path

import numpy as np

import jcal

jcal.configure()

from jcal.associate import associate  # noqa: E402
from jcal.calibration.initialise import initial_astrometric_model  # noqa: E402
from jcal_models import extra  # noqa: E402

FORMS = {"constrained": lambda m: m, "radial": extra.radial_astrometry, "pixel_grid": extra.pixel_grid_astrometry,
         "turbulent": extra.turbulent_astrometry}


def main() -> None:
    sim = jcal.simulate("tiny", seed=5)
    config = jcal.FitConfig(visit_order=3, photometry=False)
    init = initial_astrometric_model(sim.data, associate(sim.data, config), config)
    rng = np.random.default_rng(0)
    for name, make in FORMS.items():
        result = jcal.fit(sim.data, config, astrometry_model=make(init))
        folder = Path(tempfile.mkdtemp())
        jcal.save_model(result, folder / "model")
        saved = jcal.load_model(folder / "model")
        visit, detector = (np.repeat(a, 100) for a in result.association.ccd_visits.T)
        x, y = rng.uniform(0, 1024, visit.size), rng.uniform(0, 1024, visit.size)
        ra, dec = saved.pixel_to_sky(visit, detector, x, y)
        ra_np, dec_np = saved.pixel_to_sky(visit, detector, x, y, xp=np)
        print(f"{name}: {visit.size} points, max |numpy - jax| deg: ra {np.abs(ra - ra_np).max():.2e} "
              f"dec {np.abs(dec - dec_np).max():.2e}")


if __name__ == "__main__":
    main()
