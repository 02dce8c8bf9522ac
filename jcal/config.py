"""Configuration of a fit: one frozen dataclass, validated on construction.

`FitConfig` is the core's own, snake_case and typed; the Task facade
(`jcal.task.JointcalConfig`) maps jointcal's field names onto it. Configs serialise to
and from JSON (never executed), see `FitConfig.to_dict` / `FitConfig.from_dict`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

ASTROMETRY_MODELS = ("radial", "constrained", "simple")
PHOTOMETRY_MODELS = ("constrained_magnitude", "constrained_flux", "simple_magnitude", "simple_flux")


COLOUR_TERM_KEYS = ("primary", "secondary", "c0", "c1", "c2")


class ConfigError(ValueError):
    """A configuration value that is out of range; the message names the field."""


def did_you_mean(word: str, choices) -> str:
    """' (did you mean X?)' for the closest of `choices` to a misspelled `word`, or ''."""
    import difflib
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def read_json_file(path: str | Path, error: type[Exception] = ConfigError) -> Any:
    """Parse a JSON config file; any problem raises `error` naming the file (and line, column),
    deep nesting included (`jcal_models.registry.read_json`)."""
    from jcal_models.registry import read_json
    return read_json(path, error, "config file")


def line_of(path: str | Path, message: str) -> str:
    """", line N" of the first line of `path` holding the last field named (quoted) in `message`."""
    import re
    names = re.findall(r"'([A-Za-z_][\w.]*)'", message)
    if not names:
        return ""
    key = '"' + names[0].split(".")[-1] + '"'
    try:
        for number, line in enumerate(Path(path).read_text().splitlines(), 1):
            if key in line:
                return f", line {number}"
    except (OSError, UnicodeDecodeError):
        pass
    return ""


def normalise_colour_terms(terms: Any) -> dict[str, dict[str, Any]]:
    """`{band: {primary, secondary, c0, c1, c2}}` checked and completed (c0, c1, c2 default 0).

    jointcal/LSST Colorterm semantics: for visits in `band`,
    mag_instrument = mag_ref(primary) + c0 + c1 (mag_ref(primary) - mag_ref(secondary)) + c2 (...)**2,
    primary and secondary being reference catalog band names.
    """
    if not isinstance(terms, dict):
        raise ConfigError(f"config field 'colour_terms' must be a dict {{band: {{primary, secondary, c0, c1, c2}}}}, "
                          f"not {type(terms).__name__}")
    out: dict[str, dict[str, Any]] = {}
    for band, term in terms.items():
        where = f"config field 'colour_terms' band {band!r}"
        if not isinstance(term, dict):
            raise ConfigError(f"{where}: expected a dict with keys {COLOUR_TERM_KEYS}, got {term!r}")
        unknown = sorted(set(term) - set(COLOUR_TERM_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {list(COLOUR_TERM_KEYS)}")
        for name in ("primary", "secondary"):
            if not isinstance(term.get(name), str) or not term.get(name):
                raise ConfigError(f"{where}: {name!r} must name a reference catalog band, got {term.get(name)!r}")
        if term["primary"] == term["secondary"]:
            raise ConfigError(f"{where}: primary and secondary are both {term['primary']!r}; the colour would be 0")
        coeffs = {}
        for name in ("c0", "c1", "c2"):
            value = term.get(name, 0.0)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{where}: {name!r} must be a finite number, got {value!r}")
            coeffs[name] = float(value)
        out[str(band)] = {"primary": term["primary"], "secondary": term["secondary"], **coeffs}
    return out


@dataclass(frozen=True)
class FitConfig:
    # What to fit.
    astrometry: bool = True
    photometry: bool = True

    # Source selection (applied before association).
    min_snr: float = 10.0  # instFlux / instFluxErr
    # Association.
    match_radius_arcsec: float = 1.0  # detections of one star across visits
    ref_match_radius_arcsec: float = 1.0  # fitted star <-> reference star
    min_measurements: int = 2  # a fitted star needs this many points (see reference_counts)
    # A matched reference star counts as one of a star's points (gbdes' rule): a star seen once with a
    # reference match is fitted, which is all that constrains a survey's edge. False: jointcal's rule
    # (detections only).
    reference_counts: bool = True
    # Before matching, align each visit (shift, rotation, scale) and detector-visit (shift) on the
    # reference catalog from pair offsets within this radius (jcal.align); 0: use the first guess as is.
    align_radius_arcsec: float = 6.0
    # After the astrometric fit, when its stars would match more reference stars than the association
    # found (> 1 % more), associate again through the fitted map and refit; at most this many times.
    rematch_rounds: int = 2
    # Input screening before association (jcal.screen): "drop" (warned, counted in metrics.json)
    # or "error" (InputError naming them).
    duplicate_detections: Literal["drop", "error"] = "drop"  # same detector-visit and source_id or x, y
    outside_detector: Literal["drop", "error"] = "drop"  # beyond the detector by > outside_margin_pixels
    outside_margin_pixels: float = 50.0
    far_off_wcs: Literal["drop", "error"] = "drop"  # no reference star and no other visit near its footprint

    # Astrometric model.
    # radial: constrained + one radial optical distortion (r^3, r^5) shared by all visits, between the
    # detector and visit maps, so each visit needs only a low order (jcal_models.extra.RadialAstrometry)
    astrometry_model: Literal["radial", "constrained", "simple"] = "radial"
    chip_order: int = 1  # constrained: per-detector pixel -> focal plane
    visit_order: int = 2  # radial/constrained: per-visit focal plane -> tangent plane (jointcal: 5)
    simple_order: int = 3  # simple: per detector-visit pixel -> tangent plane
    proper_motion: Literal["auto", "on", "off"] = "auto"  # auto: on when visits span > pm_min_baseline_years
    pm_min_baseline_years: float = 1.0
    pm_prior_mas_yr: float = 10.0  # Gaussian prior width on proper motions of stars without a reference one
    reference_error_mas: float | None = None  # overrides (or supplies missing) refcat position errors
    astrometry_pedestal_mas: float = 0.0  # added in quadrature to every centroid error (on the sky)

    # Photometric model.
    photometry_model: Literal[
        "constrained_magnitude", "constrained_flux", "simple_magnitude", "simple_flux"
    ] = "constrained_magnitude"
    photometry_visit_order: int = 3  # Chebyshev order of the per-visit focal-plane field (jointcal: 7)
    # constrained photometric models: order of each detector's own field over its pixels (1: a linear
    # gradient across the detector); 0: a constant per detector (jointcal's model)
    photometry_detector_order: int = 1
    flux_pedestal: float = 0.0  # fractional, added in quadrature to instFluxErr / instFlux
    # Flux models' error sigma = |calibration| err moves with the model. "minimum": the fit ends at
    # the minimum of chi2 (the error's derivative in the Jacobian; unbiased). "jointcal": jointcal's
    # fixed point (error held during each solve, refreshed until nothing moves; level ~0.1-0.5 % low).
    flux_errors: Literal["minimum", "jointcal"] = "minimum"
    magnitude_pedestal: float = 0.0  # mag, added in quadrature
    reference_band: str | None = None  # refcat band for each visit band; None: same name
    # Colour terms {band: {"primary": refcat band, "secondary": refcat band, "c0", "c1", "c2"}}:
    # visits in `band` see mag_ref(primary) + c0 + c1 colour + c2 colour^2, colour = primary - secondary
    # (jointcal's colorterm library). A band listed here takes its reference fluxes from `primary`.
    colour_terms: dict[str, dict[str, Any]] = field(default_factory=dict)
    fit_colour_terms: bool = False  # fit c1 of every band in colour_terms (its value there: the start)

    # Validation: this fraction of the stars without a reference star and with >= 3 detections is held
    # out of the astrometric fit; their residuals (stars refitted on the final mapping) are reported.
    holdout_fraction: float = 0.1

    # Solver.
    outlier_sigma: float = 5.0  # reject at this many sigma (equivalent Gaussian tail)
    max_iterations: int = 20  # Gauss-Newton steps per stage
    tolerance: float = 1e-6  # stop when chi2 changes by less than this fraction
    line_search: bool = True
    max_outlier_rounds: int = 20

    # Outputs.
    wcs_format: Literal["sip", "tpv", "both"] = "sip"  # FITS WCS files: TAN-SIP, TPV, or both (wcs_tpv/)

    def __post_init__(self):
        def check(name: str, ok: bool, allowed: str):
            if not ok:
                raise ConfigError(f"config field {name!r} = {getattr(self, name)!r} is invalid: {allowed}")

        check("astrometry_model", self.astrometry_model in ASTROMETRY_MODELS, f"one of {ASTROMETRY_MODELS}")
        check("photometry_model", self.photometry_model in PHOTOMETRY_MODELS, f"one of {PHOTOMETRY_MODELS}")
        check("flux_errors", self.flux_errors in ("minimum", "jointcal"), "'minimum' or 'jointcal'")
        check("wcs_format", self.wcs_format in ("sip", "tpv", "both"), "one of ('sip', 'tpv', 'both')")
        check("proper_motion", self.proper_motion in ("auto", "on", "off"), "one of ('auto', 'on', 'off')")
        for name in ("duplicate_detections", "outside_detector", "far_off_wcs"):
            check(name, getattr(self, name) in ("drop", "error"), "'drop' or 'error'")
        for name in ("chip_order", "visit_order", "simple_order", "photometry_visit_order",
                     "photometry_detector_order"):
            v = getattr(self, name)
            check(name, isinstance(v, int) and 0 <= v <= 12, "an integer in [0, 12]")
        check("chip_order", self.chip_order >= 1, "at least 1 (a detector needs an affine map)")
        check("simple_order", self.simple_order >= 1, "at least 1")
        check("visit_order", self.visit_order >= 1, "at least 1")
        check("min_measurements", isinstance(self.min_measurements, int) and self.min_measurements >= 1,
              "an integer >= 1")
        for name in ("min_snr", "astrometry_pedestal_mas", "flux_pedestal", "magnitude_pedestal",
                     "pm_min_baseline_years", "outside_margin_pixels", "align_radius_arcsec"):
            check(name, float(getattr(self, name)) >= 0, "a number >= 0")
        for name in ("match_radius_arcsec", "ref_match_radius_arcsec", "outlier_sigma", "tolerance",
                     "pm_prior_mas_yr"):
            check(name, float(getattr(self, name)) > 0, "a number > 0")
        check("reference_error_mas", self.reference_error_mas is None or self.reference_error_mas > 0,
              "None or a number > 0")
        check("max_iterations", isinstance(self.max_iterations, int) and self.max_iterations >= 1,
              "an integer >= 1")
        check("rematch_rounds", isinstance(self.rematch_rounds, int) and self.rematch_rounds >= 0,
              "an integer >= 0")
        check("max_outlier_rounds", isinstance(self.max_outlier_rounds, int) and self.max_outlier_rounds >= 0,
              "an integer >= 0")
        check("astrometry", isinstance(self.astrometry, bool), "True or False")
        check("reference_counts", isinstance(self.reference_counts, bool), "True or False")
        check("holdout_fraction", 0.0 <= float(self.holdout_fraction) < 0.5, "a number in [0, 0.5)")
        check("photometry", isinstance(self.photometry, bool), "True or False")
        check("astrometry", self.astrometry or self.photometry, "at least one of astrometry/photometry must be on")
        object.__setattr__(self, "colour_terms", normalise_colour_terms(self.colour_terms))
        check("fit_colour_terms", isinstance(self.fit_colour_terms, bool), "True or False")
        check("fit_colour_terms", not self.fit_colour_terms or bool(self.colour_terms),
              "True needs colour_terms naming, per band to fit, the primary and secondary reference bands")

    def replace(self, **changes: Any) -> "FitConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "FitConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            hints = "".join(did_you_mean(name, known) for name in unknown)
            raise ConfigError(f"unknown config field(s) {unknown}{hints}; known fields: {sorted(known)}")
        return cls(**values)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "FitConfig":
        """Read a JSON file written by `save`; errors name the file (and the line of the field)."""
        values = read_json_file(path)
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a JSON object of config fields, got {type(values).__name__}")
        try:
            return cls.from_dict(values)
        except (ConfigError, TypeError) as exc:
            raise ConfigError(f"{path}{line_of(path, str(exc))}: {exc}") from exc
