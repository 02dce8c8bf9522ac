"""Summary of a fit's output WCS files: python benchmarks/wcs_outputs.py OUT_DIR [OUT_DIR/wcs_tpv].

Per folder: number of files, worst JCAL_RMS / JCAL_MAX (mas, the header against the exact model)
and JCAL_IMX (px, inverse SIP), the distance of CRPIX from the detector centre (px), the largest
offset at a detector centre of the TAN part alone from the full WCS (arcsec), and any warning
astropy raises on opening (there should be none)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from jcal.io.sip import tan_part


def summarise(folder: Path) -> dict:
    rows, caught = [], []
    for path in sorted(folder.glob("*.fits")):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            h = fits.getheader(path)
            full, tan = WCS(h), WCS(tan_part(h))
        caught += [str(x.message) for x in w]
        cx, cy = (h["IMAGEW"] - 1) / 2, (h["IMAGEH"] - 1) / 2
        a = full.pixel_to_world(cx, cy)
        b = tan.pixel_to_world(cx, cy)
        rows.append((h["JCAL_RMS"], h["JCAL_MAX"], h.get("JCAL_IMX", 0.0),
                     np.hypot(h["CRPIX1"] - 1 - cx, h["CRPIX2"] - 1 - cy), a.separation(b).arcsec))
    r = np.array(rows)
    return {"folder": str(folder), "files": len(rows), "max_rms_mas": r[:, 0].max(), "max_max_mas": r[:, 1].max(),
            "max_inverse_px": r[:, 2].max(), "max_crpix_offset_px": r[:, 3].max(),
            "max_tan_only_offset_arcsec": r[:, 4].max(), "warnings": sorted(set(caught))}


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        folder = Path(arg)
        print(summarise(folder / "wcs" if (folder / "wcs").is_dir() else folder))
