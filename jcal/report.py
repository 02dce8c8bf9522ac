"""Diagnostic report of a fit's output directory: `make_report(out_dir)` -> `out_dir/report/index.html`.

Reads `measurements.parquet`, `stars.parquet`, `metrics.json` (photometry columns when present)
and writes PNGs (matplotlib, Agg) plus an HTML page referencing them, atomically
(`jcal.io.atomic.atomic_output_dir`): the report directory appears complete or not at all.

Normalised residuals: the measurement table carries the whitened chi2 of each measurement
but not its two whitened components, so the normalised components are approximated as
residual * sqrt(chi2 / |residual|^2) (exact when the centroid covariance is isotropic).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from .io.atomic import atomic_output_dir

MAX_VISIT_PLOTS = 12
_FLUX_COLUMNS = ("calibrated_mag", "mag", "inst_flux", "instFlux")
_PHOT_RESIDUAL_COLUMNS = ("residual_mag", "photometry_residual_mag", "mag_residual", "residual_flux")


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _read(out_dir: Path):
    import pyarrow.parquet as pq
    meas = {k: np.asarray(v) for k, v in pq.read_table(out_dir / "measurements.parquet").to_pydict().items()}
    stars_path = out_dir / "stars.parquet"
    stars = ({k: np.asarray(v) for k, v in pq.read_table(stars_path).to_pydict().items()}
             if stars_path.exists() else {})
    metrics_path = out_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    return meas, stars, metrics


def focal_positions(ra, dec, visit):
    """Per-visit gnomonic projection [deg] of (ra, dec) about the visit's mean direction."""
    a, d = np.radians(ra), np.radians(dec)
    xyz = np.stack([np.cos(d) * np.cos(a), np.cos(d) * np.sin(a), np.sin(d)], 1)
    u = np.zeros_like(ra, dtype=float)
    v = np.zeros_like(ra, dtype=float)
    for vis in np.unique(visit):
        sel = visit == vis
        c = xyz[sel].mean(0)
        c /= np.linalg.norm(c)
        east = np.cross([0.0, 0.0, 1.0], c)
        east /= max(np.linalg.norm(east), 1e-12)
        north = np.cross(c, east)
        p = xyz[sel]
        w = p @ c
        u[sel] = np.degrees((p @ east) / w)
        v[sel] = np.degrees((p @ north) / w)
    return u, v


def normalised_residuals(meas) -> tuple[np.ndarray, np.ndarray]:
    rx, ry = meas["residual_ra_mas"], meas["residual_dec_mas"]
    r2 = np.maximum(rx**2 + ry**2, 1e-300)
    scale = np.sqrt(np.maximum(meas["chi2"], 0) / r2)
    return rx * scale, ry * scale


def residual_correlation(u, v, rx, ry, group, r_max, n_bins=12):
    """Two-point correlation of residual vectors within each group (visit).

    Returns bin centres and (xi_plus, xi_tt, xi_xx, pair counts) where, for a pair with
    separation direction t and its perpendicular x, xi_tt = <r1.t r2.t>, xi_xx = <r1.x r2.x>
    and xi_plus = xi_tt + xi_xx = <r1 . r2>. Pair counts by scipy cKDTree, vectorised.
    """
    from scipy.spatial import cKDTree
    edges = np.geomspace(r_max / 50, r_max, n_bins + 1)
    s_tt, s_xx, cnt = (np.zeros(n_bins) for _ in range(3))
    for g in np.unique(group):
        idx = np.flatnonzero(group == g)
        if len(idx) < 2:
            continue
        pos = np.stack([u[idx], v[idx]], 1)
        pairs = cKDTree(pos).query_pairs(r_max, output_type="ndarray")
        if len(pairs) == 0:
            continue
        i, j = idx[pairs[:, 0]], idx[pairs[:, 1]]
        dx, dy = u[j] - u[i], v[j] - v[i]
        sep = np.hypot(dx, dy)
        b = np.searchsorted(edges, sep) - 1
        ok = (b >= 0) & (b < n_bins)
        tx, ty = dx / np.maximum(sep, 1e-300), dy / np.maximum(sep, 1e-300)
        t1, t2 = rx[i] * tx + ry[i] * ty, rx[j] * tx + ry[j] * ty
        x1, x2 = -rx[i] * ty + ry[i] * tx, -rx[j] * ty + ry[j] * tx
        s_tt += np.bincount(b[ok], (t1 * t2)[ok], n_bins)
        s_xx += np.bincount(b[ok], (x1 * x2)[ok], n_bins)
        cnt += np.bincount(b[ok], None, n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        tt, xx = s_tt / cnt, s_xx / cnt
    xi_e, xi_b = eb_modes(tt + xx, tt - xx, np.log(edges[1] / edges[0]))
    return np.sqrt(edges[1:] * edges[:-1]), {"xi_plus": tt + xx, "xi_tt": tt, "xi_xx": xx, "xi_E": xi_e,
                                             "xi_B": xi_b, "pairs": cnt}


def eb_modes(xi_plus: np.ndarray, xi_minus: np.ndarray, dlnr: float) -> tuple[np.ndarray, np.ndarray]:
    """E (curl-free) and B (divergence-free) parts of a residual vector field's correlation.

    For an isotropic 2-d vector field with power spectra P_E, P_B: xi_plus = int (P_E + P_B) J0
    and xi_minus = xi_tt - xi_xx = -int (P_E - P_B) J2; since J2(x) - 2 J1(x)/x = -J0(x) and
    int_x^inf J2(y)/y dy = J1(x)/x, xi_minus(r) - 2 int_r^inf xi_minus(r') dr'/r' = int (P_E - P_B) J0.
    Hence xi_E = (xi_plus + that)/2 and xi_B = (xi_plus - that)/2. Bins are log-spaced (step
    `dlnr`); the integral is truncated at the largest separation (taken as zero beyond).
    """
    m = np.nan_to_num(xi_minus)
    tail = np.cumsum(m[::-1])[::-1] - 0.5 * m  # sum over bins >= i, half weight at i
    j0_part = xi_minus - 2.0 * tail * dlnr
    return 0.5 * (xi_plus + j0_part), 0.5 * (xi_plus - j0_part)


def make_report(out_dir, *, overwrite: bool = True, shown_as=None) -> Path:
    """Write `out_dir/report/index.html` and its PNGs; returns the path of index.html.

    shown_as: the output path the page names (default `out_dir`; differs while `out_dir` is
    the temporary folder of an output being written).
    """
    out_dir = Path(out_dir)
    meas, stars, metrics = _read(out_dir)
    plt = _plt()
    figures: list[tuple[str, str, str]] = []  # (section, file, caption)
    notes: list[str] = []
    has_astrometry = "residual_ra_mas" in meas
    with atomic_output_dir(out_dir / "report", overwrite=overwrite) as tmp:
        def save(fig, name, section, caption):
            fig.savefig(tmp / name, dpi=90)
            plt.close(fig)
            figures.append((section, name, caption))

        if has_astrometry:
            _astrometry_figures(plt, meas, metrics, save, notes)
        else:
            notes.append("No astrometric residual columns: astrometry was not fitted.")
        _photometry_figures(plt, meas, save, notes)
        (tmp / "index.html").write_text(_html(shown_as or out_dir, metrics, figures, notes))
    return out_dir / "report" / "index.html"


def _astrometry_figures(plt, meas, metrics, save, notes):
    visit, det = meas["visit"], meas["detector"]
    out = meas["outlier"].astype(bool)
    rx, ry = meas["residual_ra_mas"], meas["residual_dec_mas"]
    u, v = focal_positions(meas["ra"], meas["dec"], visit)
    visits = np.unique(visit)
    rms = float(np.sqrt(np.mean(np.concatenate([rx[~out], ry[~out]]) ** 2))) if (~out).any() else 1.0
    # quiver per visit
    for vis in visits[:MAX_VISIT_PLOTS]:
        s = visit == vis
        fig, ax = plt.subplots(figsize=(6, 5.5))
        good, bad = s & ~out, s & out
        sc = ax.scatter(u[s], v[s], c=det[s], s=3, cmap="tab20", alpha=0.4)
        q = ax.quiver(u[good], v[good], rx[good], ry[good], angles="xy", scale_units="xy",
                      scale=rms / (0.04 * max(np.ptp(u[s]), 1e-9)), width=0.003)
        ax.quiverkey(q, 0.85, 1.02, 3 * rms, f"{3 * rms:.1f} mas", labelpos="E")
        if bad.any():
            ax.scatter(u[bad], v[bad], marker="x", c="red", s=30, label=f"outliers ({bad.sum()})")
            ax.legend(loc="lower right", fontsize=8)
        fig.colorbar(sc, ax=ax, label="detector")
        ax.set(xlabel="focal u [deg]", ylabel="focal v [deg]", title=f"visit {vis}: astrometric residuals",
               aspect="equal")
        save(fig, f"quiver_visit_{vis}.png", "Residual maps", f"Visit {vis}: residual vectors over the focal "
             "plane (fitted ra/dec projected about the visit's mean position); red crosses: rejected outliers.")
    if len(visits) > MAX_VISIT_PLOTS:
        notes.append(f"Residual maps shown for the first {MAX_VISIT_PLOTS} of {len(visits)} visits.")
    # normalised-residual histograms
    nx, ny = normalised_residuals(meas)
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(-6, 6, 61)
    for arr, lab in ((nx[~out], "RA"), (ny[~out], "Dec")):
        ax.hist(np.clip(arr, -6, 6), bins=bins, density=True, histtype="step", label=f"{lab} (std {np.std(arr):.2f})")
    g = np.linspace(-6, 6, 200)
    ax.plot(g, np.exp(-g**2 / 2) / np.sqrt(2 * np.pi), "k--", label="N(0,1)")
    ax.set_yscale("log")
    ax.set_ylim(1e-4, 1)
    ax.set(xlabel="normalised residual", ylabel="density")
    ax.legend(fontsize=8)
    save(fig, "hist_normalised.png", "Residual distributions",
         "Normalised residuals of non-outlier measurements against N(0,1).")
    # chi2/ndof per detector-visit
    dets = np.unique(det)
    grid = np.full((len(visits), len(dets)), np.nan)
    vi, di = np.searchsorted(visits, visit), np.searchsorted(dets, det)
    c2 = np.bincount(vi * len(dets) + di, np.where(out, 0, meas["chi2"]), grid.size)
    n = np.bincount(vi * len(dets) + di, (~out).astype(float), grid.size)
    with np.errstate(invalid="ignore", divide="ignore"):
        grid = (c2 / (2 * n)).reshape(grid.shape)
    fig, ax = plt.subplots(figsize=(max(4, 0.4 * len(dets) + 2), max(3, 0.3 * len(visits) + 1.5)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="chi2 / (2 n)")
    ax.set_xticks(range(len(dets)), [str(d) for d in dets], fontsize=7)
    ax.set_yticks(range(len(visits)), [str(x) for x in visits], fontsize=7)
    ax.set(xlabel="detector", ylabel="visit", title="chi2 per measurement coordinate")
    save(fig, "chi2_ccd_visit.png", "Per detector-visit",
         "chi2 per measured coordinate (2 per measurement, ~ chi2/ndof) of every detector-visit, outliers excluded.")
    # residual vs magnitude
    mag, label = None, None
    for col in _FLUX_COLUMNS:
        if col in meas:
            vals = np.asarray(meas[col], float)
            mag = vals if "mag" in col else -2.5 * np.log10(np.where(vals > 0, vals, np.nan))
            label = col if "mag" in col else f"-2.5 log10({col})"
            break
    xlab = label
    if mag is None:
        mag = np.hypot(u, v)
        xlab = "focal radius [deg]"
        notes.append("No flux or magnitude column in measurements.parquet: astrometric residuals are plotted "
                     "against focal-plane radius instead of magnitude.")
    fig, ax = plt.subplots(figsize=(6, 4))
    r = np.hypot(rx, ry)
    ax.scatter(mag[~out], r[~out], s=2, alpha=0.4, label="measurements")
    if out.any():
        ax.scatter(mag[out], r[out], s=15, c="red", marker="x", label="outliers")
    ax.set_yscale("log")
    ax.set(xlabel=xlab, ylabel="|residual| [mas]")
    ax.legend(fontsize=8)
    save(fig, "residual_vs_mag.png", "Residual vs magnitude", f"Astrometric residual amplitude vs {xlab}.")
    # two-point correlation
    keep = ~out
    r_max = float(np.median([np.ptp(u[visit == vv]) for vv in visits])) / 2 or 1.0
    centres, xi = residual_correlation(u[keep], v[keep], rx[keep], ry[keep], visit[keep], r_max)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.axhline(0, color="k", lw=0.5)
    for key, style in (("xi_plus", "o-"), ("xi_tt", "s--"), ("xi_xx", "^:"), ("xi_E", "D-"), ("xi_B", "v-")):
        ax.plot(centres * 60, xi[key], style, label=key)
    ax.set_xscale("log")
    ax.set(xlabel="separation [arcmin]", ylabel="correlation [mas^2]", title="residual two-point correlation")
    ax.legend(fontsize=8)
    save(fig, "correlation.png", "Residual correlation",
         "Within-visit two-point correlation of residual vectors: xi_plus = <r1.r2>, xi_tt (along the separation), "
         "xi_xx (across it), and its E (curl-free) and B (divergence-free) modes.")
    # chi2 history
    hist = [float(h) for h in metrics.get("astrometry_chi2_history", [])]
    if hist:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(np.arange(1, len(hist) + 1), hist, "o-")
        ax.set_yscale("log")
        ax.set(xlabel="iteration", ylabel="chi2", title="astrometric chi2 per iteration")
        save(fig, "chi2_history.png", "Convergence", "Astrometric chi2 after each Gauss-Newton iteration.")
    else:
        notes.append("metrics.json has no astrometry_chi2_history.")


def _photometry_figures(plt, meas, save, notes):
    col = next((c for c in _PHOT_RESIDUAL_COLUMNS if c in meas), None)
    if col is None:
        notes.append("No photometric residual columns in measurements.parquet (photometry not fitted): "
                     "no photometric residual maps.")
        return
    visit = meas["visit"]
    u, v = (focal_positions(meas["ra"], meas["dec"], visit) if "ra" in meas else (meas["x"], meas["y"]))
    res = np.asarray(meas[col], float)
    lim = np.nanpercentile(np.abs(res), 95) or 1.0
    for vis in np.unique(visit)[:MAX_VISIT_PLOTS]:
        s = visit == vis
        fig, ax = plt.subplots(figsize=(6, 5))
        sc = ax.scatter(u[s], v[s], c=res[s], s=6, cmap="coolwarm", vmin=-lim, vmax=lim)
        fig.colorbar(sc, ax=ax, label=col)
        ax.set(xlabel="focal u", ylabel="focal v", title=f"visit {vis}: photometric residuals", aspect="equal")
        save(fig, f"phot_visit_{vis}.png", "Photometric residual maps", f"Visit {vis}: {col} over the focal plane.")


def _html(out_dir, metrics, figures, notes) -> str:
    keys = ["astrometry_chi2_per_ndof", "astrometry_final_chi2", "astrometry_final_ndof", "astrometry_iterations",
            "astrometry_outliers", "astrometry_reference_outliers", "astrometry_converged",
            "astrometry_prepared_fittedStars", "astrometry_prepared_refStars", "astrometry_prepared_ccdImages"]
    keys += [k for k in metrics if k.startswith("photometry_") and not isinstance(metrics[k], (dict, list))]
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(metrics[k]))}</td></tr>"
                   for k in keys if k in metrics)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>jcal report</title></head><body>",
             f"<h1>jcal fit report</h1><p>{html.escape(str(out_dir))}</p>",
             f"<h2>Metrics</h2><table border='1'>{rows}</table>"]
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    section = None
    for sec, name, caption in figures:
        if sec != section:
            parts.append(f"<h2>{html.escape(sec)}</h2>")
            section = sec
        parts.append(f"<figure><img src='{name}' alt='{name}'><figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)
