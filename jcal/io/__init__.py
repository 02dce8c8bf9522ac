"""Reading and writing jcal's on-disk formats; every output directory is written atomically."""

from jcal.io.atomic import OutputExistsError, UnsafeOverwriteError, atomic_output_dir, check_target
from jcal.io.input_dir import read_input, write_input
from jcal.io.manifest import verify as verify_output

__all__ = ["read_input", "write_input", "atomic_output_dir", "check_target", "verify_output", "OutputExistsError",
           "UnsafeOverwriteError"]
