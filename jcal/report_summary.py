"""The figures a report opens with, computed from a fit's outputs, and the page around the plots.

`summary(meas, metrics)` is what an astronomer reads first: astrometric RMS per coordinate in
mas (overall and per visit), chi2/ndof, held-out residuals when the metrics carry them,
photometric repeatability and residual RMS in mmag, counts, and the warnings with the
detector-visits they name. Residual statistics use the measurements that constrain their star
(not rejected, and not the only term of a star: those have residual 0 and say nothing), so the
RMS and the normalised residuals describe the same points as chi2/ndof.
"""

from __future__ import annotations

import html
import math
import re

import numpy as np

# held-out (validation) metrics, whichever names a fit gives them
_HELD_OUT = re.compile(r"held_?out|holdout|validation|cross_?val", re.IGNORECASE)
# labels of the held-out figures jcal's fit writes (metrics.json "holdout"); others keep their key
_HELD_OUT_LABELS = {
    "holdout.stars": "held-out stars (kept out of the fit)",
    "holdout.astrometry_measurements": "held-out measurements",
    "holdout.astrometry_rms_mas": "held-out astrometric RMS per coordinate [mas]",
    "holdout.astrometry_chi2_per_point": "held-out chi2 per coordinate",
    "holdout.astrometry_outliers": "held-out measurements beyond 5 sigma",
    "holdout.fraction": "fraction of stars held out"}


def constrained(meas) -> np.ndarray:
    """(n,) measurements that test the fit: not rejected, not held out of it (those have their own
    figures), and not their star's only constraint (leave-one-out chi2 0 with a residual of 0: a
    single detection without reference)."""
    out = np.asarray(meas["outlier"], bool) | held_out(meas)
    if "chi2_deleted" in meas:
        return ~out & (np.asarray(meas["chi2_deleted"]) > 0)
    return ~out & (np.hypot(meas["residual_ra_mas"], meas["residual_dec_mas"]) > 0)


def held_out(meas) -> np.ndarray:
    """(n,) measurements of the stars held out of the fit to validate it (none in older outputs)."""
    return np.asarray(meas["held_out"], bool) if "held_out" in meas else np.zeros(len(meas["visit"]), bool)


def photometry_constrained(meas) -> np.ndarray:
    used = np.asarray(meas["photometry_used"], bool) if "photometry_used" in meas else np.ones(len(meas["visit"]), bool)
    if "photometry_informative" in meas:
        return used & np.asarray(meas["photometry_informative"], bool)
    return used & (np.asarray(meas.get("residual_mag", np.ones(used.size))) != 0)


def _rms(a) -> float:
    a = np.asarray(a, float)
    return float(np.sqrt(np.mean(a**2))) if a.size else float("nan")


def summary(meas, metrics) -> dict:
    """The report's headline figures (also written as report/summary.json)."""
    visit = np.asarray(meas["visit"])
    out: dict = {"counts": {
        "visits": int(np.unique(visit).size),
        "detector_visits": int(np.unique(np.stack([visit, meas["detector"]], 1), axis=0).shape[0]),
        "measurements": int(visit.size),
        "stars": int(np.unique(meas["star"]).size) if "star" in meas else None}}
    if "residual_ra_mas" in meas:
        use = constrained(meas)
        rx, ry = np.asarray(meas["residual_ra_mas"]), np.asarray(meas["residual_dec_mas"])
        per_visit = {int(v): {"rms_mas": _rms(np.concatenate([rx[use & (visit == v)], ry[use & (visit == v)]])),
                              "n": int(np.sum(use & (visit == v)))} for v in np.unique(visit)}
        out["astrometry"] = {
            "rms_mas": _rms(np.concatenate([rx[use], ry[use]])),
            "rms_ra_mas": _rms(rx[use]), "rms_dec_mas": _rms(ry[use]),
            "chi2_per_ndof": metrics.get("astrometry_chi2_per_ndof"),
            "constrained": int(use.sum()),
            "unconstrained": int(np.sum(~np.asarray(meas["outlier"], bool) & ~held_out(meas) & ~use)),
            "outliers": int(np.sum(np.asarray(meas["outlier"], bool))),
            "reference_stars": metrics.get("astrometry_prepared_refStars"), "per_visit": per_visit}
    if "residual_mag" in meas:
        use = photometry_constrained(meas) & np.isfinite(meas["residual_mag"])
        out["photometry"] = {
            "repeatability_mmag": metrics.get("photometry_repeatability_mmag"),
            "residual_rms_mmag": _rms(np.asarray(meas["residual_mag"])[use]) * 1000.0,
            "chi2_per_ndof": metrics.get("photometry_chi2_per_ndof"),
            "constrained": int(use.sum()),
            "unconstrained": int(np.sum(np.asarray(meas.get("photometry_used", use), bool) & ~use)),
            "outliers": int(np.sum(np.asarray(meas.get("photometry_outlier", np.zeros(use.size)), bool)))}
    out["held_out"] = _held_out(metrics)
    if "astrometry" in out and isinstance(metrics.get("holdout"), dict):  # jcal's own held-out stars, per visit
        for v, d in metrics["holdout"].get("per_visit", {}).items():
            if int(v) in out["astrometry"]["per_visit"]:
                out["astrometry"]["per_visit"][int(v)]["held_out_rms_mas"] = d.get("rms_mas")
    out["warnings"] = _warnings(metrics)
    return out


def _held_out(metrics) -> dict:
    """Numeric metrics whose name says held-out/validation, nested dicts flattened with '.'."""
    out = {}
    for key, value in metrics.items():
        if not _HELD_OUT.search(key):
            continue
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items() if isinstance(v, (int, float))})
        elif isinstance(value, (int, float)):
            out[key] = value
    return out


def _warnings(metrics) -> list[str]:
    notes = [str(w) for w in metrics.get("warnings", [])]
    for what in ("astrometry", "photometry"):
        if metrics.get(f"{what}_converged") is False:
            notes.append(f"{what}: the fit did not converge within its iterations")
    return notes


# ------------------------------------------------------------------------------------------ page
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
main{max-width:1280px;margin:0 auto;padding:18px 24px}
h1{font-size:1.5em;margin:0 0 2px}h2{font-size:1.2em;margin:26px 0 8px;border-bottom:1px solid #ccd;padding-bottom:4px}
.path{color:#667;font-size:.9em;margin-bottom:14px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(190px,1fr));gap:10px}
.card{background:#fff;border-radius:8px;padding:10px 14px;box-shadow:0 1px 2px rgba(0,0,0,.08)}
.card .v{font-size:1.55em;font-weight:600}.card .l{color:#556;font-size:.85em}
table{border-collapse:collapse;background:#fff;font-size:.9em}td,th{padding:3px 10px;border-bottom:1px solid #e3e5ea;text-align:right}
th{background:#eef0f4}td:first-child,th:first-child{text-align:left}
.warn{background:#fff6e0;border-left:4px solid #e0a000;padding:8px 12px;margin:6px 0;border-radius:4px;font-size:.92em}
.ok{background:#e8f6ec;border-left:4px solid #2a9d4b;padding:8px 12px;border-radius:4px;font-size:.92em}
.figs{display:grid;grid-template-columns:repeat(auto-fit,minmax(520px,1fr));gap:14px}
figure{background:#fff;margin:0;padding:8px;max-width:860px;border-radius:8px;box-shadow:0 1px 2px rgba(0,0,0,.08)}
figure img{width:100%;height:auto}figcaption{font-size:.85em;color:#445;margin-top:4px}
details{margin-top:8px}summary{cursor:pointer;color:#335}
"""


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def _card(label: str, value, key: str, digits: int = 3) -> str:
    return (f"<div class='card'><div class='v' data-key='{key}'>{html.escape(_fmt(value, digits))}</div>"
            f"<div class='l'>{html.escape(label)}</div></div>")


def page(out_dir, s: dict, figures, notes) -> str:
    """The HTML page: summary cards, warnings, per-visit table, then the figures by section."""
    parts = ["<!doctype html><html><head><meta charset='utf-8'><meta name='viewport' content='width=device-width'>",
             f"<title>jcal report</title><style>{_CSS}</style></head><body><main>",
             "<h1>jcal fit report</h1>", f"<div class='path'>{html.escape(str(out_dir))}</div>", "<div class='cards'>"]
    a, p, c = s.get("astrometry"), s.get("photometry"), s["counts"]
    if a:
        parts += [_card("astrometric RMS per coordinate [mas]", a["rms_mas"], "astrometry.rms_mas"),
                  _card("astrometric chi2 / ndof", a["chi2_per_ndof"], "astrometry.chi2_per_ndof", 4)]
    if p:
        parts += [_card("photometric repeatability [mmag] (S/N > 100)", p["repeatability_mmag"],
                        "photometry.repeatability_mmag"),
                  _card("photometric residual RMS [mmag] (all S/N)", p["residual_rms_mmag"], "photometry.residual_rms_mmag"),
                  _card("photometric chi2 / ndof", p["chi2_per_ndof"], "photometry.chi2_per_ndof", 4)]
    for k, v in s["held_out"].items():
        parts.append(_card(_HELD_OUT_LABELS.get(k, f"held out: {k.replace('_', ' ')}"), v, f"held_out.{k}"))
    parts += [_card("visits / detector-visits", f"{c['visits']} / {c['detector_visits']}", "counts.visits"),
              _card("measurements / stars", f"{_fmt(c['measurements'])} / {_fmt(c['stars'])}", "counts.measurements")]
    if a:
        parts += [_card("astrometric outliers", a["outliers"], "astrometry.outliers"),
                  _card("unconstrained (single detection, no reference)", a["unconstrained"], "astrometry.unconstrained")]
    parts.append("</div><h2>Warnings</h2>")
    warnings = s["warnings"] + list(notes)
    parts += [f"<div class='warn'>{html.escape(w)}</div>" for w in warnings] or ["<div class='ok'>none</div>"]
    if a:
        held = any("held_out_rms_mas" in d for d in a["per_visit"].values())
        rows = "".join(f"<tr><td>{v}</td><td>{d['n']:,}</td><td>{_fmt(d['rms_mas'])}</td>"
                       + (f"<td>{_fmt(d.get('held_out_rms_mas'))}</td>" if held else "") + "</tr>"
                       for v, d in a["per_visit"].items())
        parts.append("<details><summary>astrometric RMS per visit</summary><table><tr><th>visit</th>"
                     "<th>constrained measurements</th><th>RMS per coordinate [mas]</th>"
                     + ("<th>held-out stars: RMS per coordinate [mas]</th>" if held else "")
                     + f"</tr>{rows}</table></details>")
    section = None
    for sec, name, caption in figures:
        if sec != section:
            parts.append(("</div>" if section else "") + f"<h2>{html.escape(sec)}</h2><div class='figs'>")
            section = sec
        parts.append(f"<figure><img src='{name}' alt='{html.escape(caption)}'>"
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append(("</div>" if section else "") + "</main></body></html>")
    return "\n".join(parts)
