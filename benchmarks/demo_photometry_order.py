"""Photometric field order on the demo's survey (small preset): error against the truth and
suspect detector-visits. Result (2-core CPU) in demo_photometry_order.txt:
order 7: 3 suspect, 9.0 mmag; order 5: 0, 2.9 mmag; order 3: 0, 2.1 mmag."""
import jcal, logging, time
from jcal.truth import photometric_error_mmag
logging.basicConfig(level=logging.WARNING)
sim = jcal.simulate("small", seed=0)
for order in (7, 5, 3):
    t = time.time()
    r = jcal.fit(sim.data, jcal.FitConfig(visit_order=3, photometry_visit_order=order))
    print(order, r.photometry.counts.get('suspect_ccd_visits'), 'err mmag', photometric_error_mmag(sim, r), 'chi2/ndof', r.metrics['photometry_final_chi2']/r.metrics['photometry_final_ndof'], time.time()-t, flush=True)
