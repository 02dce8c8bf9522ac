"""Wall time of `jcal --help` and `jcal fit --help` (lazy imports: no JAX, no astropy):
python benchmarks/cli_startup.py. Before the lazy imports (a39bc71): 6.46 s and 6.23 s on this
2-core machine under load (`import jax` alone 2.3 s, astropy.wcs 0.7 s); after, under the same
load: 0.22 s and 0.21 s; idle, best of 3: 0.06 s and 0.05 s (cli_startup.txt)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

jcal = str(Path(sys.executable).with_name("jcal"))
for argv in (["--help"], ["fit", "--help"]):
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run([jcal, *argv], capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
    print(f"jcal {' '.join(argv)}: best of 3 {min(times):.2f} s")
