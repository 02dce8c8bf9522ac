"""The two calibrations, fitted by one recipe.

- `recipe`: the fit as declared steps (`Fit`, `RejectGross`, `RejectUntilClean`, `FitHeldOut`,
  `IterateErrors`, `Rematch`) run over an immutable `FitState`, and the `Calibration` each side supplies;
- `astrometry`, `photometry`: each calibration's recipe, error model and fit (`fit_astrometry`,
  `fit_photometry`); `*_problem`: its residuals and set-up; `*_result`: what its fit returns;
- `astrometry_setup`, `photometry_setup`, `initialise`: reference constraints, starting values.
"""
