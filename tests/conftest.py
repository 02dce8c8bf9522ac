import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # 2-core machines: BLAS threads only contend

from pathlib import Path  # noqa: E402

import jcal  # noqa: E402

jcal.configure()  # before any JAX computation, as the CLI does: the fits run as in production

# Real data the tests read ship inside the repository (tests/data/README.md: provenance, licence).
DATA = Path(__file__).resolve().parent / "data"
