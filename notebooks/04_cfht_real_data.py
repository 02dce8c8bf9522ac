# %% [markdown]
# # A real (minimal) CFHT data set
# Read LSST pipeline outputs and inspect them: sources, selection counts, refcat, WCS, association.
# It is too small to constrain an astrometric fit, so only the association is shown.

# %%
from pathlib import Path
import numpy as np
import jcal
from jcal.io.lsst import read_lsst

jcal.configure()  # JAX set up for jcal (64-bit floats, ...) before any computation

folder = Path("..") / "tests" / "data" / "cfht_minimal"  # shipped with jcal (its README: provenance)
inputs = read_lsst(folder, reference_error_mas=10)
data = inputs.data

# %%
src = data.sources
print("sources:", len(src.x), "visits:", np.unique(src.visit).tolist(), "detectors:", np.unique(src.detector).tolist())
print("selection:", getattr(inputs, "selection_counts", getattr(inputs, "counts", None)))
print("refcat stars:", len(data.refcat.ra))

# %%
for (visit, detector), cv in list(data.ccd_visits.items())[:3]:
    ra, dec = cv.wcs.all_pix2world([[cv.nx / 2, cv.ny / 2]], 0)[0]
    print(visit, detector, cv.nx, cv.ny, f"centre ra={ra:.5f} dec={dec:.5f}")

# %%
assoc = jcal.associate(data, jcal.FitConfig(reference_error_mas=10))
print(dict(assoc.counts))
