"""Reading and writing jcal's on-disk formats; every output directory is written atomically."""

from jcal.io.atomic import atomic_output_dir
from jcal.io.input_dir import read_input, write_input

__all__ = ["read_input", "write_input", "atomic_output_dir"]
