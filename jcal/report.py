"""Diagnostic report of a fit's output directory: `make_report(out_dir)` -> `out_dir/report/index.html`.

Reads `measurements.parquet`, `stars.parquet`, `metrics.json` (photometry columns when present)
and writes PNGs plus an HTML page that opens with a summary (`jcal.report_summary`), atomically
(`jcal.io.atomic.atomic_output_dir`): the report directory appears complete or not at all.
Figures are drawn with matplotlib's object API (no pyplot, no backend switch), so a notebook
that makes a report keeps its inline plots.

Normalised residuals: the measurement table carries each measurement's whitened chi2 and its
leave-one-out chi2 (`chi2_deleted`: the chi2 it would have had its star been fitted without
it), not the two whitened components, so the components are taken as
residual * sqrt(chi2_deleted / |residual|^2) (exact when the centroid covariance is isotropic).
The leave-one-out chi2 carries the star's share of the degrees of freedom: its mean is 2 per
measurement when the errors are right, as chi2/ndof's is 1, whereas the raw chi2 of a star
seen n times averages 2 (n - 1) / n (std ~0.77 for the typical 2-3 detections).
Measurements that are their star's only constraint (residual 0) are counted, not plotted as 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .io.atomic import atomic_output_dir
from .report_summary import constrained, held_out, page, photometry_constrained, summary

MAX_VISIT_PLOTS = 12
_FLUX_COLUMNS = ("calib_mag", "calibrated_mag", "mag", "inst_flux", "instFlux")
_PHOT_RESIDUAL_COLUMNS = ("residual_mag", "photometry_residual_mag", "mag_residual", "residual_flux")


def _figure(width: float = 6.4, height: float = 4.6):
    """(Figure, Axes) with constrained layout: labels never clipped, colour bars beside."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.add_subplot()


def _focal_axes(ax, unit: str) -> None:
    """Focal-plane axes: equal scale, at most 5 ticks (long tick labels of degrees collide)."""
    from matplotlib.ticker import MaxNLocator
    ax.set(xlabel=f"focal plane u [{unit}]", ylabel=f"focal plane v [{unit}]", aspect="equal")
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.yaxis.set_major_locator(MaxNLocator(6))


def _log_axis(ax, which: str = "y") -> None:
    """Log scale, called after plotting: at most ~7 labelled decades and no minor labels (no
    colliding ticks); over less than two decades 2 and 5 are labelled too, in plain numbers."""
    from matplotlib.ticker import FuncFormatter, LogFormatterSciNotation, LogLocator, NullFormatter
    axis = ax.yaxis if which == "y" else ax.xaxis
    (ax.set_yscale if which == "y" else ax.set_xscale)("log")
    lo, hi = ax.get_ylim() if which == "y" else ax.get_xlim()
    axis.set_major_locator(LogLocator(base=10, numticks=7))
    if lo > 0 and np.log10(hi / lo) < 2:
        plain = FuncFormatter(lambda value, _: f"{value:g}")
        axis.set_major_formatter(plain)
        axis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
        axis.set_minor_formatter(plain)
    else:
        axis.set_major_formatter(LogFormatterSciNotation())
        axis.set_minor_formatter(NullFormatter())


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
    """Normalised residual components, with the errors and degrees of freedom of chi2 (see the
    module docstring): leave-one-out chi2 when the table has it, else the raw chi2."""
    rx, ry = meas["residual_ra_mas"], meas["residual_dec_mas"]
    r2 = np.maximum(rx**2 + ry**2, 1e-300)
    scale = np.sqrt(np.maximum(meas.get("chi2_deleted", meas["chi2"]), 0) / r2)
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
    """Write `out_dir/report/index.html`, its PNGs and `summary.json`; returns the path of index.html.

    shown_as: the output path the page names (default `out_dir`; differs while `out_dir` is
    the temporary folder of an output being written).
    """
    out_dir = Path(out_dir)
    meas, stars, metrics = _read(out_dir)
    figures: list[tuple[str, str, str]] = []  # (section, file, caption)
    notes: list[str] = []
    s = summary(meas, metrics)
    with atomic_output_dir(out_dir / "report", overwrite=overwrite) as tmp:
        def save(fig, name, section, caption):
            fig.savefig(tmp / name, dpi=100)
            figures.append((section, name, caption))

        if "residual_ra_mas" in meas:
            _astrometry_figures(meas, metrics, save, notes)
        else:
            notes.append("No astrometric residual columns: astrometry was not fitted.")
        _photometry_figures(meas, save, notes)
        (tmp / "summary.json").write_text(json.dumps(s, indent=1, default=float) + "\n")
        (tmp / "index.html").write_text(page(shown_as or out_dir, s, figures, notes))
    return out_dir / "report" / "index.html"


def _astrometry_figures(meas, metrics, save, notes):
    visit = meas["visit"]
    out = meas["outlier"].astype(bool)
    use = constrained(meas)
    rx, ry = meas["residual_ra_mas"], meas["residual_dec_mas"]
    u, v = focal_positions(meas["ra"], meas["dec"], visit)
    visits = np.unique(visit)
    rms = float(np.sqrt(np.mean(np.concatenate([rx[use], ry[use]]) ** 2))) if use.any() else 1.0
    for vis in visits[:MAX_VISIT_PLOTS]:
        _quiver(meas, u, v, vis, use, out, rms, save)
    if len(visits) > MAX_VISIT_PLOTS:
        notes.append(f"Residual maps shown for the first {MAX_VISIT_PLOTS} of {len(visits)} visits.")
    _normalised_histogram(meas, use, metrics, save)
    _chi2_map(meas, use, visits, save)
    _residual_vs_magnitude(meas, u, v, use, out, save, notes)
    # two-point correlation
    r_max = float(np.median([np.ptp(u[visit == vv]) for vv in visits])) / 2 or 1.0
    centres, xi = residual_correlation(u[use], v[use], rx[use], ry[use], visit[use], r_max)
    fig, ax = _figure()
    ax.axhline(0, color="k", lw=0.5)
    for key, style in (("xi_plus", "o-"), ("xi_tt", "s--"), ("xi_xx", "^:"), ("xi_E", "D-"), ("xi_B", "v-")):
        ax.plot(centres * 60, xi[key], style, label=key.replace("xi_", "ξ "), ms=4)
    _log_axis(ax, "x")
    ax.set(xlabel="separation [arcmin]", ylabel="correlation [mas²]", title="Residual two-point correlation")
    ax.legend(fontsize=8, ncols=2)
    save(fig, "correlation.png", "Residual correlation",
         "Within-visit two-point correlation of residual vectors: ξ plus = <r1·r2>, ξ tt (along the separation), "
         "ξ xx (across it), and its E (curl-free) and B (divergence-free) modes. Flat at 0: no structure left.")
    hist = [float(h) for h in metrics.get("astrometry_chi2_history", [])]
    if hist:
        fig, ax = _figure(5.5, 3.8)
        ax.plot(np.arange(1, len(hist) + 1), hist, "o-", ms=4)
        _log_axis(ax, "y")
        ax.set(xlabel="Gauss-Newton iteration", ylabel="chi2 (dimensionless)", title="Astrometric chi2 per iteration")
        save(fig, "chi2_history.png", "Convergence", "Astrometric chi2 after each Gauss-Newton iteration.")
    else:
        notes.append("metrics.json has no astrometry_chi2_history.")


def _binned_means(u, v, rx, ry, cells: int = 10, min_count: int = 4):
    """Mean residual vector in a cells x cells grid over (u, v): centres, means, counts (cells
    with at least min_count points). Single residuals are noise; their mean shows what is left."""
    ie = np.clip(((u - u.min()) / max(np.ptp(u), 1e-12) * cells).astype(int), 0, cells - 1)
    je = np.clip(((v - v.min()) / max(np.ptp(v), 1e-12) * cells).astype(int), 0, cells - 1)
    k = ie * cells + je
    n = np.bincount(k, None, cells * cells)
    keep = n >= min_count
    mean = [np.bincount(k, a, cells * cells)[keep] / n[keep] for a in (u, v, rx, ry)]
    return mean[0], mean[1], mean[2], mean[3], n[keep]


def _quiver(meas, u, v, vis, use, out, rms, save):
    visit, det = meas["visit"], meas["detector"]
    rx, ry = meas["residual_ra_mas"], meas["residual_dec_mas"]
    s = visit == vis
    fig, ax = _figure(6.4, 5.8)
    good, bad, free = s & use, s & out, s & ~out & ~use & ~held_out(meas)
    sc = ax.scatter(u[s], v[s], c=det[s], s=3, cmap="tab20", alpha=0.35)
    if good.sum() >= 4:
        cu, cv, mx, my, n = _binned_means(u[good], v[good], rx[good], ry[good])
        longest = max(float(np.max(np.hypot(mx, my))), 1e-6)
        q = ax.quiver(cu, cv, mx, my, angles="xy", scale_units="xy", width=0.004,
                      scale=longest / (0.08 * max(np.ptp(u[s]), 1e-9)))
        key = float(f"{longest:.1g}")
        ax.quiverkey(q, 0.99, 1.015, key, f"{key:g} mas", labelpos="W", coordinates="axes")
    if free.any():
        ax.scatter(u[free], v[free], s=12, facecolors="none", edgecolors="0.5", lw=0.6,
                   label=f"unconstrained ({free.sum()})")
    if bad.any():
        ax.scatter(u[bad], v[bad], marker="x", c="red", s=30, label=f"outliers ({bad.sum()})")
    if free.any() or bad.any():
        ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
    fig.colorbar(sc, ax=ax, label="detector", shrink=0.8)
    _focal_axes(ax, "deg")
    ax.set_title(f"Visit {vis}: mean astrometric residual", loc="left")
    save(fig, f"quiver_visit_{vis}.png", "Residual maps", f"Visit {vis}: mean residual vector (fitted position minus "
         f"its star) in a 10 x 10 grid of cells over the focal plane (RMS of single residuals {rms:.2g} mas); "
         "dots: measurements coloured by detector; grey circles: measurements that are their star's only "
         "constraint (residual 0); red crosses: rejected outliers.")


def _normalised_histogram(meas, use, metrics, save):
    nx, ny = normalised_residuals(meas)
    fig, ax = _figure()
    bins = np.linspace(-6, 6, 61)
    for arr, lab in ((nx[use], "RA"), (ny[use], "Dec")):
        ax.hist(np.clip(arr, -6, 6), bins=bins, density=True, histtype="step", lw=1.4,
                label=f"{lab}: std {np.std(arr):.3f}")
    g = np.linspace(-6, 6, 200)
    ax.plot(g, np.exp(-g**2 / 2) / np.sqrt(2 * np.pi), "k--", lw=1, label="N(0, 1)")
    _log_axis(ax, "y")
    ax.set_ylim(1e-4, 1)
    chi2 = metrics.get("astrometry_chi2_per_ndof")
    title = "Normalised residuals" + (f" (chi2/ndof = {chi2:.3f}, sqrt = {np.sqrt(chi2):.3f})" if chi2 else "")
    ax.set(xlabel="normalised residual (leave-one-out, dimensionless)", ylabel="probability density", title=title)
    ax.legend(fontsize=8)
    save(fig, "hist_normalised.png", "Residual distributions",
         "Residuals of constrained, non-outlier measurements divided by their leave-one-out error (the errors and "
         "degrees of freedom of chi2: the std matches sqrt(chi2/ndof)), against N(0, 1).")


def _chi2_map(meas, use, visits, save):
    visit, det = meas["visit"], meas["detector"]
    dets = np.unique(det)
    vi, di = np.searchsorted(visits, visit), np.searchsorted(dets, det)
    key = vi * len(dets) + di
    chi2 = np.asarray(meas.get("chi2_deleted", meas["chi2"]))
    c2 = np.bincount(key, np.where(use, chi2, 0.0), len(visits) * len(dets))
    n = np.bincount(key, use.astype(float), len(visits) * len(dets))
    with np.errstate(invalid="ignore", divide="ignore"):
        grid = (c2 / (2 * n)).reshape(len(visits), len(dets))
    fig, ax = _figure(max(5.0, 0.32 * len(dets) + 3), max(3.5, 0.26 * len(visits) + 2))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="leave-one-out chi2 per coordinate")
    step_d, step_v = max(1, len(dets) // 25), max(1, len(visits) // 30)
    ax.set_xticks(range(0, len(dets), step_d), [str(d) for d in dets[::step_d]], fontsize=8)
    ax.set_yticks(range(0, len(visits), step_v), [str(x) for x in visits[::step_v]], fontsize=8)
    ax.set(xlabel="detector", ylabel="visit", title="chi2 per coordinate by detector-visit (~1 expected)")
    save(fig, "chi2_ccd_visit.png", "Per detector-visit",
         "Mean leave-one-out chi2 per measured coordinate of every detector-visit (constrained, non-outlier "
         "measurements): ~1 where the errors are right, whatever the number of detections per star.")


def _residual_vs_magnitude(meas, u, v, use, out, save, notes):
    rx, ry = meas["residual_ra_mas"], meas["residual_dec_mas"]
    mag, xlab = None, None
    for col in _FLUX_COLUMNS:
        if col in meas:
            vals = np.asarray(meas[col], float)
            mag = vals if "mag" in col else -2.5 * np.log10(np.where(vals > 0, vals, np.nan))
            xlab = "calibrated magnitude [AB mag]" if "mag" in col else "instrumental magnitude -2.5 log10(counts)"
            break
    if mag is None:
        mag, xlab = np.hypot(u, v), "focal radius [deg]"
        notes.append("No flux or magnitude column in measurements.parquet: astrometric residuals are plotted "
                     "against focal-plane radius instead of magnitude.")
    fig, ax = _figure()
    r = np.hypot(rx, ry)
    ax.scatter(mag[use], r[use], s=2, alpha=0.35, label="measurements")
    if out.any():
        ax.scatter(mag[out], r[out], s=15, c="red", marker="x", label="outliers")
    ok = use & np.isfinite(mag)
    if ok.sum() > 20:  # binned RMS: the trend the cloud hides
        edges = np.unique(np.percentile(mag[ok], np.linspace(0, 100, 11)))
        b = np.clip(np.searchsorted(edges, mag[ok]) - 1, 0, len(edges) - 2)
        rms = np.sqrt(np.bincount(b, r[ok] ** 2 / 2, len(edges) - 1) / np.maximum(np.bincount(b, None, len(edges) - 1), 1))
        ax.plot((edges[1:] + edges[:-1]) / 2, rms, "k-o", ms=4, label="RMS per coordinate")
    _log_axis(ax, "y")
    ax.set(xlabel=xlab, ylabel="|residual| [mas]", title="Astrometric residual vs brightness")
    ax.legend(fontsize=8)
    save(fig, "residual_vs_mag.png", "Residual vs magnitude", f"Astrometric residual amplitude vs {xlab}.")


def _photometry_figures(meas, save, notes):
    col = next((c for c in _PHOT_RESIDUAL_COLUMNS if c in meas), None)
    if col is None:
        notes.append("No photometric residual columns in measurements.parquet (photometry not fitted): "
                     "no photometric residual maps.")
        return
    visit = meas["visit"]
    u, v = (focal_positions(meas["ra"], meas["dec"], visit) if "ra" in meas else (meas["x"], meas["y"]))
    unit = "deg" if "ra" in meas else "pixel"
    res = np.asarray(meas[col], float) * (1000.0 if col.endswith("mag") else 1.0)
    label = f"{col.replace('_', ' ')} [{'mmag' if col.endswith('mag') else 'nJy'}]"
    use = photometry_constrained(meas) & np.isfinite(res)
    outlier = np.asarray(meas.get("photometry_outlier", np.zeros(len(res))), bool)
    free = ~use & ~outlier
    lim = float(np.nanpercentile(np.abs(res[use]), 95)) if use.any() else 1.0
    for vis in np.unique(visit)[:MAX_VISIT_PLOTS]:
        s = visit == vis
        fig, ax = _figure(6.4, 5.6)
        if (s & free).any():
            ax.scatter(u[s & free], v[s & free], s=8, facecolors="none", edgecolors="0.6", lw=0.5,
                       label=f"unconstrained ({(s & free).sum()})")
        sc = ax.scatter(u[s & use], v[s & use], c=res[s & use], s=9, cmap="coolwarm", vmin=-lim, vmax=lim)
        if (s & outlier).any():
            ax.scatter(u[s & outlier], v[s & outlier], marker="x", c="k", s=20, label=f"outliers ({(s & outlier).sum()})")
        fig.colorbar(sc, ax=ax, label=label, shrink=0.8)
        if (s & (free | outlier)).any():
            ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
        _focal_axes(ax, unit)
        ax.set_title(f"Visit {vis}: photometric residuals", loc="left")
        save(fig, f"phot_visit_{vis}.png", "Photometric residual maps",
             f"Visit {vis}: calibrated magnitude minus its star's fitted magnitude; grey circles: measurements that "
             "are their star's only one in the band (residual 0, no information).")
