"""pex_config fields of the jcal PipelineTask, generated from `jcal.task.JointcalConfig`.

What: `pex_fields(JointcalConfig)` turns every field of jcal's own config class (jointcal's field
names, with their docs, defaults, allowed values and ranges) into the matching
``lsst.pex.config`` field, and every subtask (`ConfigurableField`) into a ``ConfigField`` of a
generated sub-config; `to_jointcal_config` copies a pex config back into a validated
`JointcalConfig`, whose `toFitConfig` the fit uses.

Why: one field table (``jcal/task/jointcal.py``) serves the standalone facade and the Rubin
middleware, so the two cannot drift; ``pipetask -c``/``-C`` then act on the same names as
``jcal fit --set``/``--config``.

Differences from the facade: a dict-valued field (``colorterms``) is a JSON string here
(pex_config has no nested-dict field; the text is parsed with `json.loads`, never executed);
subtasks cannot be retargeted from pipetask (their configs are plain ``ConfigField``s).
"""

from __future__ import annotations

import json
from typing import Any

import lsst.pex.config as pexConfig

from ..task import config as jcfg

__all__ = ["pex_fields", "to_jointcal_config", "JSON_FIELD_NOTE"]

JSON_FIELD_NOTE = " [JSON text: parsed with json.loads, never executed]"


def _pex_field(f: jcfg.Field) -> pexConfig.Field:
    """The pex_config field equivalent to one jcal field."""
    if isinstance(f, jcfg.ConfigurableField):
        return pexConfig.ConfigField(doc=f.doc, dtype=pex_config_class(f.ConfigClass))
    if isinstance(f, jcfg.ChoiceField):
        return pexConfig.ChoiceField(doc=f.doc, dtype=f.dtype, allowed=f.allowed, default=f.default,
                                     optional=f.optional)
    if isinstance(f, jcfg.RangeField) and (f.min is not None or f.max is not None):
        return pexConfig.RangeField(doc=f.doc, dtype=f.dtype, default=f.default, min=f.min, max=f.max,
                                    inclusiveMin=f.inclusiveMin, inclusiveMax=f.inclusiveMax,
                                    optional=f.optional)
    if isinstance(f, jcfg.ListField):
        return pexConfig.ListField(doc=f.doc, dtype=f.dtype, default=list(f.default or ()),
                                   optional=f.optional)
    if f.dtype is dict:
        return pexConfig.Field(doc=f.doc + JSON_FIELD_NOTE, dtype=str, default=json.dumps(f.default),
                               optional=f.optional)
    return pexConfig.Field(doc=f.doc, dtype=f.dtype, default=f.default, optional=f.optional)


def pex_fields(jcal_config_class: type[jcfg.Config]) -> dict[str, pexConfig.Field]:
    """{name: pex_config field} for every field of `jcal_config_class` (subtasks included)."""
    return {name: _pex_field(f) for name, f in jcal_config_class._fields.items()}


_GENERATED: dict[type, type] = {}


def pex_config_class(jcal_config_class: type[jcfg.Config]) -> type[pexConfig.Config]:
    """A plain ``pexConfig.Config`` subclass with the fields of `jcal_config_class` (cached)."""
    if jcal_config_class not in _GENERATED:
        _GENERATED[jcal_config_class] = type(jcal_config_class.__name__, (pexConfig.Config,), {
            "__doc__": f"pex_config twin of `{jcfg._qualified(jcal_config_class)}`.",
            "__module__": __name__, **pex_fields(jcal_config_class)})
    return _GENERATED[jcal_config_class]


def _jcal_values(pex: pexConfig.Config, jcal_class: type[jcfg.Config]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, f in jcal_class._fields.items():
        value = getattr(pex, name)
        if isinstance(f, jcfg.ConfigurableField):
            out[name] = _jcal_values(value, f.ConfigClass)
        elif f.dtype is dict and value is not None:
            try:
                out[name] = json.loads(value)
            except json.JSONDecodeError as exc:
                raise jcfg.FieldValidationError(f"config field {name!r}: not valid JSON ({exc}): {value!r}") \
                    from exc
        elif isinstance(f, jcfg.ListField) and value is not None:
            out[name] = list(value)
        else:
            out[name] = value
    return out


def to_jointcal_config(pex: pexConfig.Config, jcal_class: type[jcfg.Config]) -> jcfg.Config:
    """A validated `jcal_class` instance holding the values of the pex config `pex`."""
    config = jcal_class()
    config.applyDict(_jcal_values(pex, jcal_class))
    config.validate()
    return config
