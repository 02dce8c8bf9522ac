"""Cost of the output manifest (SHA-256 of every file) and fsync in `atomic_output_dir`.

    python benchmarks/manifest_overhead.py [small medium]

Writes each preset's simulated input folder (sources, refcat, one WCS file per detector-visit)
three times with the manifest and fsync (what jcal does) and three times without (the step
patched out), and prints the median wall time of each, the file count and the total size.
JCAL_BENCH_DIR chooses the disk (default: the temporary folder). Results: manifest_overhead.txt.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jcal
from jcal.io import atomic
from jcal.io.input_dir import write_input_files


def write_once(data, out: Path) -> float:
    t0 = time.perf_counter()
    with atomic.atomic_output_dir(out) as tmp:
        write_input_files(data, tmp)
    return time.perf_counter() - t0


def main(presets: list[str]) -> None:
    for preset in presets:
        data = jcal.simulate(preset, seed=0).data
        with tempfile.TemporaryDirectory(dir=os.environ.get("JCAL_BENCH_DIR")) as root:
            with_manifest = [write_once(data, Path(root) / f"with{i}") for i in range(3)]
            files = [p for p in (Path(root) / "with0").rglob("*") if p.is_file()]
            size_mb = sum(p.stat().st_size for p in files) / 1e6
            real = atomic.write_manifest
            atomic.write_manifest = lambda tmp: None  # baseline: no hashing, no fsync
            try:
                without = [write_once(data, Path(root) / f"without{i}") for i in range(3)]
            finally:
                atomic.write_manifest = real
        print(f"{preset}: {len(files)} files, {size_mb:.1f} MB; write with manifest+fsync "
              f"{statistics.median(with_manifest):.3f} s, without {statistics.median(without):.3f} s")


if __name__ == "__main__":
    main(sys.argv[1:] or ["small", "medium"])
