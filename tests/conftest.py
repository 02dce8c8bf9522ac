import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # 2-core machines: BLAS threads only contend

from pathlib import Path  # noqa: E402

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

# Real data the tests read ship inside the repository (tests/data/README.md: provenance, licence).
DATA = Path(__file__).resolve().parent / "data"
