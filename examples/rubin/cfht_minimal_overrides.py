# pex_config override file for jcal's PipelineTask on tests/data/cfht_minimal (`pipetask run -C jcal:THIS`):
# jointcal's cfht_minimal photometry test, the values of configs/jointcal_cfht_minimal.json that
# differ from jcal's defaults (tests/test_rubin.py checks the two agree). pipetask executes this file
# (pex_config's design): it is the user's own file, jcal itself only reads JSON.
config.doAstrometry = False
config.minMeasurements = 1
config.astrometryReferenceErr = 10.0
# jointcal's rules and models where jcal's defaults differ
config.astrometryModel = "constrained"
config.astrometryVisitOrder = 5
config.photometryVisitOrder = 7
config.fluxErrors = "jointcal"
config.referenceCounts = False
config.alignRadius = 0.0
config.rematchRounds = 0
config.photometryDetectorOrder = 0
config.holdoutFraction = 0.0
config.connections.referenceCatalog = "sdss_dr9_fink_v5b"
