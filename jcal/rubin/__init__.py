"""jcal inside the Rubin middleware (optional extra ``pip install -e ".[rubin]"``): see docs/rubin.md.

`JcalPipelineTask` (`jcal.rubin.task`) is an ``lsst.pipe.base.PipelineTask`` with jointcal's
dimensions and config names; `jcal.rubin.storage` holds the butler storage class for the FITS
inputs; `jcal.rubin.repo` prepares a repository from an LSST-layout folder. Importing this package
needs ``lsst.pipe.base``; ``import jcal`` never imports it.
"""

from .task import JcalConnections, JcalPipelineConfig, JcalPipelineTask

__all__ = ["JcalConnections", "JcalPipelineConfig", "JcalPipelineTask"]
