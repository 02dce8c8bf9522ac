import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # 2-core machines: BLAS threads only contend

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
