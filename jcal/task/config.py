"""A small pex_config-like configuration system (no lsst packages needed).

    class MyConfig(Config):
        order = RangeField("polynomial order", int, default=3, min=0, max=12)
        model = ChoiceField("model", str, allowed={"a": "first", "b": "second"}, default="a")
        sub = MySubTask.makeField("a configurable subtask")

Fields are typed and documented; every assignment is validated and a bad value raises
`FieldValidationError` naming the field and the allowed values. `freeze()` makes a config
(and its sub-configs) read-only. Configs compare equal by value, save to / load from JSON
(loading never executes or imports code: a retargeted subtask is looked up among the Task
classes already imported), and take dotted overrides (``sub.field=value``).
"""

from __future__ import annotations

import ast
import copy
import json
from pathlib import Path
from typing import Any

from ..config import did_you_mean, line_of, read_json_file

__all__ = ["Config", "Field", "ChoiceField", "RangeField", "ListField", "ConfigurableField",
           "ConfigurableInstance", "FieldValidationError", "FrozenConfigError", "parse_value"]


class FieldValidationError(ValueError):
    """A bad config value; the message names the field and what is allowed."""


class FrozenConfigError(AttributeError):
    """Assignment to a frozen config."""


_TASK_REGISTRY: dict[str, type] = {}  # "module.QualName" -> Task class; filled by Task.__init_subclass__


def _hint(name: str, fields) -> str:
    """The closest field to a misspelled `name`, else the list of fields."""
    return did_you_mean(name, fields) or f"; fields: {list(fields)}"


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def parse_value(text: str) -> Any:
    """A command-line value: a Python literal (never executed) or else the bare string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    except (RecursionError, MemoryError) as exc:
        raise FieldValidationError(f"value {text[:40]!r}... is nested too deeply to be a config value") from exc


class Field:
    """A typed, documented config field with a default and optional extra check."""

    def __init__(self, doc: str, dtype: type, default: Any = None, check=None, optional: bool = False):
        self.doc, self.dtype, self.default, self.check, self.optional = doc, dtype, default, check, optional
        self.name = "?"

    def __set_name__(self, owner, name):
        self.name = name

    def _fail(self, value, allowed: str):
        raise FieldValidationError(f"config field {self.name!r} = {value!r} is invalid: expected {allowed}"
                                   f" ({self.doc})")

    def describe_allowed(self) -> str:
        return f"a {self.dtype.__name__}" + (" or None" if self.optional else "")

    def coerce(self, value):
        if value is None:
            if not self.optional:
                self._fail(value, self.describe_allowed() + " (this field is not optional)")
            return None
        if self.dtype is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if self.dtype is not bool and isinstance(value, bool) and self.dtype in (int, float):
            self._fail(value, self.describe_allowed())
        if not isinstance(value, self.dtype):
            self._fail(value, self.describe_allowed())
        if self.check is not None and not self.check(value):
            self._fail(value, self.describe_allowed() + " passing the field's check")
        return value

    def to_json(self, value):
        return value

    def from_json(self, value):
        return value

    def __get__(self, instance, owner):
        if instance is None:
            return self
        return instance._storage[self.name]

    def __set__(self, instance, value):
        if instance._frozen:
            raise FrozenConfigError(f"cannot set {self.name!r}: config {type(instance).__name__} is frozen")
        instance._storage[self.name] = self.coerce(value)


class ChoiceField(Field):
    """A field whose value must be one of `allowed` (a dict value -> description)."""

    def __init__(self, doc, dtype, allowed: dict, default=None, optional=False):
        super().__init__(doc, dtype, default, optional=optional)
        self.allowed = dict(allowed)

    def describe_allowed(self):
        return f"one of {list(self.allowed)}" + (" or None" if self.optional else "")

    def coerce(self, value):
        value = super().coerce(value)
        if value is not None and value not in self.allowed:
            self._fail(value, self.describe_allowed())
        return value


class RangeField(Field):
    """A number in [min, max] (bounds optional, inclusive unless told otherwise)."""

    def __init__(self, doc, dtype, default=None, min=None, max=None, inclusiveMin=True, inclusiveMax=True,
                 optional=False):
        super().__init__(doc, dtype, default, optional=optional)
        self.min, self.max, self.inclusiveMin, self.inclusiveMax = min, max, inclusiveMin, inclusiveMax

    def describe_allowed(self):
        lo = "-inf" if self.min is None else self.min
        hi = "inf" if self.max is None else self.max
        text = (f"a {self.dtype.__name__} in {'[' if self.inclusiveMin else '('}{lo}, {hi}"
                f"{']' if self.inclusiveMax else ')'}")
        return text + (" or None" if self.optional else "")

    def coerce(self, value):
        value = super().coerce(value)
        if value is None:
            return value
        if self.min is not None and (value < self.min or (value == self.min and not self.inclusiveMin)):
            self._fail(value, self.describe_allowed())
        if self.max is not None and (value > self.max or (value == self.max and not self.inclusiveMax)):
            self._fail(value, self.describe_allowed())
        return value


class ListField(Field):
    """A list of `dtype` items, stored as a tuple (so a frozen config cannot be mutated)."""

    def __init__(self, doc, dtype, default=(), minLength=None, maxLength=None, itemCheck=None, optional=False):
        super().__init__(doc, dtype, tuple(default) if default is not None else None, optional=optional)
        self.minLength, self.maxLength, self.itemCheck = minLength, maxLength, itemCheck

    def describe_allowed(self):
        return f"a list of {self.dtype.__name__}" + (" or None" if self.optional else "")

    def coerce(self, value):
        if value is None:
            return Field.coerce(self, value)
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            self._fail(value, self.describe_allowed())
        items = tuple(value)
        for item in items:
            if not isinstance(item, self.dtype) or (self.itemCheck and not self.itemCheck(item)):
                self._fail(value, self.describe_allowed() + f" (bad item {item!r})")
        if self.minLength is not None and len(items) < self.minLength:
            self._fail(value, self.describe_allowed() + f" of length >= {self.minLength}")
        if self.maxLength is not None and len(items) > self.maxLength:
            self._fail(value, self.describe_allowed() + f" of length <= {self.maxLength}")
        return items

    def to_json(self, value):
        return None if value is None else list(value)


class ConfigurableInstance:
    """The value of a `ConfigurableField`: a target (Task class) and its config.

    Attribute access forwards to the config, so ``config.sub.field = 3`` works as in pex_config.
    """

    def __init__(self, field: "ConfigurableField", owner: "Config", target: type, ConfigClass: type):
        object.__setattr__(self, "_field", field)
        object.__setattr__(self, "_owner", owner)
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_value", ConfigClass())

    target = property(lambda self: self._target)
    value = property(lambda self: self._value)
    ConfigClass = property(lambda self: type(self._value))

    def retarget(self, target: type, ConfigClass: type | None = None) -> None:
        """Use `target` (a Task class) for this subtask; its config becomes a fresh `ConfigClass`."""
        if self._owner._frozen:
            raise FrozenConfigError(f"cannot retarget {self._field.name!r}: config is frozen")
        base = self._field.target
        if not (isinstance(target, type) and issubclass(target, base)):
            raise FieldValidationError(
                f"config field {self._field.name!r}: cannot retarget to {target!r}: not a subclass of "
                f"{_qualified(base)}, whose methods the parent task calls (subclass it to replace it)")
        ConfigClass = ConfigClass or getattr(target, "ConfigClass", None)
        if ConfigClass is None or not (isinstance(ConfigClass, type) and issubclass(ConfigClass, Config)):
            raise FieldValidationError(f"config field {self._field.name!r}: retarget to {target!r} needs a "
                                       "Config subclass (target.ConfigClass or the ConfigClass argument)")
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_value", ConfigClass())

    def apply(self, *args, **kwargs):
        """Construct the target task with this config."""
        return self._target(*args, config=self._value, **kwargs)

    def __getattr__(self, name):
        return getattr(self._value, name)

    def __setattr__(self, name, value):
        setattr(self._value, name, value)

    def __eq__(self, other):
        return (isinstance(other, ConfigurableInstance) and self._target is other._target
                and self._value == other._value)

    def __repr__(self):
        return f"ConfigurableInstance(target={_qualified(self._target)}, value={self._value!r})"


class ConfigurableField(Field):
    """A subtask: a target Task class plus a nested config; retargetable (`retarget`)."""

    def __init__(self, doc, target: type, ConfigClass: type | None = None):
        super().__init__(doc, object)
        self.target = target
        self.ConfigClass = ConfigClass or target.ConfigClass

    def describe_allowed(self):
        return f"a {self.ConfigClass.__name__} (sub-config of subtask {self.target.__name__})"

    def make(self, owner):
        return ConfigurableInstance(self, owner, self.target, self.ConfigClass)

    def __set__(self, instance, value):
        if instance._frozen:
            raise FrozenConfigError(f"cannot set {self.name!r}: config {type(instance).__name__} is frozen")
        current = instance._storage[self.name]
        if isinstance(value, ConfigurableInstance):
            value = value.value
        if not isinstance(value, current.ConfigClass):
            self._fail(value, f"a {current.ConfigClass.__name__}")
        object.__setattr__(current, "_value", copy.deepcopy(value))

    def to_json(self, value: ConfigurableInstance):
        out = {"__target__": _qualified(value.target)}
        out.update(value.value.toDict())
        return out


class Config:
    """Base of task configs: declare `Field`s as class attributes."""

    _fields: dict[str, Field] = {}

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        fields: dict[str, Field] = {}
        for klass in reversed(cls.__mro__):
            for name, value in vars(klass).items():
                if isinstance(value, Field):
                    fields[name] = value
        cls._fields = fields

    def __init__(self, **kwargs):
        object.__setattr__(self, "_frozen", False)
        object.__setattr__(self, "_storage", {})
        for name, f in self._fields.items():
            if isinstance(f, ConfigurableField):
                self._storage[name] = f.make(self)
            else:
                self._storage[name] = f.coerce(copy.deepcopy(f.default))
        self.setDefaults()
        self.update(**kwargs)

    def setDefaults(self) -> None:
        """Hook: subclasses change defaults (including of sub-configs) here."""

    # -- mutation ---------------------------------------------------------------------------------
    def __setattr__(self, name, value):
        if name not in self._fields:
            raise AttributeError(f"{type(self).__name__} has no config field {name!r}; fields: {list(self._fields)}")
        super().__setattr__(name, value)

    def update(self, **kwargs) -> None:
        for k, v in kwargs.items():
            setattr(self, k, v)

    def freeze(self) -> "Config":
        object.__setattr__(self, "_frozen", True)
        for name, f in self._fields.items():
            if isinstance(f, ConfigurableField):
                self._storage[name].value.freeze()
        return self

    @property
    def frozen(self) -> bool:
        return self._frozen

    def validate(self) -> None:
        """Check cross-field constraints (single fields are checked on assignment)."""
        for name, f in self._fields.items():
            if isinstance(f, ConfigurableField):
                self._storage[name].value.validate()

    def applyOverride(self, key: str, value: Any) -> None:
        """Set a (dotted) field, e.g. ``sourceSelector.signalToNoiseMin``; strings are parsed as literals."""
        if isinstance(value, str):
            value = parse_value(value)
        head, _, rest = key.partition(".")
        if head not in self._fields:
            raise FieldValidationError(f"unknown config field {key!r} in {type(self).__name__}"
                                       f"{_hint(head, self._fields)}")
        if rest:
            if not isinstance(self._fields[head], ConfigurableField):
                raise FieldValidationError(f"config field {head!r} has no sub-fields (in override {key!r})")
            self._storage[head].value.applyOverride(rest, value)
        else:
            setattr(self, head, value)

    def applyOverrides(self, pairs: list[str]) -> None:
        """Apply ``key=value`` strings in order."""
        for pair in pairs or []:
            if "=" not in pair:
                raise FieldValidationError(f"override {pair!r}: expected key=value")
            key, value = pair.split("=", 1)
            self.applyOverride(key.strip(), value.strip())

    # -- (de)serialisation ------------------------------------------------------------------------
    def toDict(self) -> dict[str, Any]:
        return {name: f.to_json(self._storage[name]) for name, f in self._fields.items()}

    def applyDict(self, values: dict[str, Any], where: str = "") -> None:
        for key, value in values.items():
            if key == "__target__":
                continue
            if key not in self._fields:
                raise FieldValidationError(f"unknown config field {where + key!r} in {type(self).__name__}"
                                           f"{_hint(key, self._fields)}")
            f = self._fields[key]
            if isinstance(f, ConfigurableField):
                if not isinstance(value, dict):
                    raise FieldValidationError(f"config field {where + key!r}: expected an object of sub-fields")
                inst = self._storage[key]
                target = value.get("__target__")
                if target is not None and target != _qualified(inst.target):
                    if target not in _TASK_REGISTRY:
                        raise FieldValidationError(
                            f"config field {where + key!r}: target {target!r} is not a Task class known to this "
                            "process (import its module first; loading a config never imports code)")
                    inst.retarget(_TASK_REGISTRY[target])
                inst.value.applyDict(value, where + key + ".")
            else:
                setattr(self, key, f.from_json(value))

    def save(self, path: str | Path) -> None:
        """Write the config as indented JSON (human-readable, loadable with `load`)."""
        Path(path).write_text(self.toJson())

    def toJson(self) -> str:
        return json.dumps({"__class__": _qualified(type(self)), **self.toDict()}, indent=2) + "\n"

    def load(self, path: str | Path) -> "Config":
        """Apply a JSON file written by `save` (or a subset of its keys) onto this config.

        Errors (unreadable file, invalid or too deeply nested JSON, a bad field) raise
        `FieldValidationError` naming the file and, where it can be found, the line."""
        values = read_json_file(path, FieldValidationError)
        if not isinstance(values, dict):
            raise FieldValidationError(f"{path}: expected a JSON object of config fields")
        values.pop("__class__", None)
        try:
            self.applyDict(values)
        except FieldValidationError as exc:
            raise FieldValidationError(f"{path}{line_of(path, str(exc))}: {exc}") from exc
        return self

    @classmethod
    def fromFile(cls, path: str | Path) -> "Config":
        return cls().load(path)

    def describe(self, prefix: str = "config.") -> str:
        """One line per field: ``config.name = value  # doc`` (sub-configs indented by dotted names)."""
        lines = []
        for name, f in self._fields.items():
            v = self._storage[name]
            if isinstance(f, ConfigurableField):
                lines.append(f"# {f.doc}")
                lines.append(f"{prefix}{name}.retarget({_qualified(v.target)})")
                lines.append(v.value.describe(prefix + name + "."))
            else:
                extra = f" [{f.describe_allowed()}]"
                lines.append(f"{prefix}{name} = {json.dumps(f.to_json(v))}  # {f.doc}{extra}")
        return "\n".join(lines)

    def __eq__(self, other):
        return type(self) is type(other) and self.toDict() == other.toDict()

    def __iter__(self):
        return iter(self._fields)

    def keys(self):
        return list(self._fields)

    def items(self):
        return [(k, getattr(self, k)) for k in self._fields]

    def __repr__(self):
        return f"{type(self).__name__}({self.toDict()!r})"

    def __deepcopy__(self, memo):
        new = type(self)()
        new.applyDict(self.toDict())
        # retargets to classes not in the registry (e.g. local classes) are carried over directly
        for name, f in self._fields.items():
            if isinstance(f, ConfigurableField):
                src, dst = self._storage[name], new._storage[name]
                if src.target is not dst.target:
                    dst.retarget(src.target, src.ConfigClass)
                    dst.value.applyDict(src.value.toDict())
        return new
