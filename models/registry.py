"""Saving and loading model forms exactly, by registered class name: no pickle, no code run on load.

A form is saved as two files:

- `<name>.json`: the module tree, each module by its registered class name and its fields -
  arrays by shape, dtype and backend, other values (orders, group keys, ids) as JSON;
- `<name>.eqx`: the array leaves in tree order (`equinox.tree_serialise_leaves`: numpy's
  `.npy` format, read with pickling off).

Loading reads the JSON, checks ALL of it (class names registered, fields as the class declares
them, shapes and dtypes well formed, the `.eqx` long enough), builds a skeleton of the declared
structure without calling any `__init__`, reads the arrays into it, checks that nothing is left
over in the `.eqx`, and runs every module's `__check_init__`. Only classes registered in this
process can be named: every subclass of `jcal_models.AbstractForm` (`Transform`,
`PhotometricTransform`, ...) registers itself when defined; any other `equinox.Module` used
inside a form is registered with `@register`. Errors are `ModelFileError`s naming the file,
the place in the tree and the problem.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import numpy as np

FORMAT, VERSION = "jcal-model", 2
_REGISTRY: dict[str, type] = {}
_DTYPES = {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32",
           "float64", "complex64", "complex128"}
_MAX_DEPTH = 64  # module nesting deeper than this is not a model form


class ModelFileError(ValueError):
    """A saved model that cannot be loaded; the message names the file and what is wrong."""


def register(cls: type | None = None, *, name: str | None = None):
    """Register an `equinox.Module` class for saving under `name` (default `module.qualname`).

    Usable as `@register` or `@register(name="...")`. Registering the same name again replaces
    the entry when it is the same class redefined (same module and qualname: a notebook cell run
    twice); another class under a taken name is refused."""

    def add(klass: type) -> type:
        if not (isinstance(klass, type) and issubclass(klass, eqx.Module)):
            raise TypeError(f"only equinox.Module classes can be registered for saving, not {klass!r}")
        key = name or class_name(klass)
        old = _REGISTRY.get(key)
        if old is not None and class_name(old) != class_name(klass):
            raise ValueError(f"model class name {key!r} is already registered to {class_name(old)}")
        _REGISTRY[key] = klass
        if name is not None:
            klass.__jcal_name__ = name  # what `describe` writes for it
        return klass

    return add if cls is None else add(cls)


def class_name(cls: type) -> str:
    """The name a class is saved under."""
    return cls.__dict__.get("__jcal_name__") or f"{cls.__module__}.{cls.__qualname__}"


def registered(name: str) -> type:
    """The class registered under `name` (KeyError if none)."""
    return _REGISTRY[name]


# -- describing a tree --------------------------------------------------------------------------


def describe(tree: Any, where: str = "model") -> Any:
    """JSON-able description of `tree` (see the module docstring); TypeError for what cannot be saved."""
    if isinstance(tree, eqx.Module):
        cls = type(tree)
        key = class_name(cls)
        if _REGISTRY.get(key) is None:
            raise TypeError(f"cannot save {where}: {cls.__qualname__} is not registered; subclass "
                            "jcal_models.Transform / PhotometricTransform or decorate it with @jcal_models.register")
        fields = {}
        for f in dataclasses.fields(tree):
            value = getattr(tree, f.name)
            if f.metadata.get("static", False) and _holds_array(value):
                raise TypeError(f"cannot save {where}.{f.name}: a static field holds an array (it would not be "
                                "saved); make the field a fixed_field() without static=True")
            fields[f.name] = describe(value, f"{where}.{f.name}")
        return {"module": key, "fields": fields}
    if isinstance(tree, (jax.Array, np.ndarray, np.generic)):
        backend = "jax" if isinstance(tree, jax.Array) else "numpy" if isinstance(tree, np.ndarray) else "scalar"
        return {"array": {"shape": list(np.shape(tree)), "dtype": str(tree.dtype), "backend": backend}}
    if tree is None or isinstance(tree, (bool, int, str)):
        return tree
    if isinstance(tree, float):
        return tree if math.isfinite(tree) else {"float": repr(tree)}
    if isinstance(tree, (tuple, list)):
        return {type(tree).__name__: [describe(v, f"{where}[{i}]") for i, v in enumerate(tree)]}
    if isinstance(tree, dict) and all(isinstance(k, str) for k in tree):
        return {"dict": {k: describe(v, f"{where}[{k!r}]") for k, v in tree.items()}}
    raise TypeError(f"cannot save {where}: a {type(tree).__name__} (only arrays, numbers, strings, booleans, None, "
                    "tuples, lists, str-keyed dicts and registered modules can be saved)")


def _holds_array(value: Any) -> bool:
    return any(isinstance(v, (jax.Array, np.ndarray)) for v in jax.tree.leaves(value))


# -- rebuilding a tree from its description -----------------------------------------------------


class _Builder:
    """Checks a description and builds the skeleton it describes (arrays: shape/dtype only)."""

    def __init__(self, file: Path):
        self.file, self.nbytes, self.jax64 = file, 0, False

    def fail(self, where: str, problem: str):
        raise ModelFileError(f"{self.file}: {where}: {problem}")

    def build(self, node: Any, where: str, depth: int = 0) -> Any:
        if depth > _MAX_DEPTH:
            self.fail(where, f"nested more than {_MAX_DEPTH} levels deep")
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if isinstance(node, dict) and "module" in node:
            return self.module(node, where, depth)
        if not isinstance(node, dict) or len(node) != 1:
            self.fail(where, f"expected a tagged value ({{'module'|'array'|'tuple'|'list'|'dict'|'float': ...}}), "
                             f"got {_short(node)}")
        (tag, value), = node.items()
        if tag == "array":
            return self.array(value, where)
        if tag in ("tuple", "list") and isinstance(value, list):
            items = [self.build(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
            return tuple(items) if tag == "tuple" else items
        if tag == "dict" and isinstance(value, dict):
            return {k: self.build(v, f"{where}[{k!r}]", depth + 1) for k, v in value.items()}
        if tag == "float" and value in ("inf", "-inf", "nan"):
            return float(value)
        self.fail(where, f"unknown or malformed tag {tag!r}")

    def module(self, node: dict, where: str, depth: int) -> Any:
        name, fields = node.get("module"), node.get("fields")
        if set(node) != {"module", "fields"} or not isinstance(name, str) or not isinstance(fields, dict):
            self.fail(where, "a module needs exactly {'module': class name, 'fields': {...}}")
        cls = _REGISTRY.get(name)
        if cls is None:
            self.fail(where, f"class {name!r} is not registered in this process: import (or define) it before "
                             "loading - subclasses of jcal_models.Transform / PhotometricTransform register "
                             "themselves, other modules with @jcal_models.register")
        declared = [f.name for f in dataclasses.fields(cls)]
        missing, unknown = sorted(set(declared) - set(fields)), sorted(set(fields) - set(declared))
        if missing or unknown:
            self.fail(where, f"{name} declares fields {declared}; missing {missing}, unknown {unknown}")
        obj = object.__new__(cls)  # as equinox's own unflatten: no __init__ runs
        for key in declared:
            object.__setattr__(obj, key, self.build(fields[key], f"{where}.{key}", depth + 1))
        return obj

    def array(self, spec: Any, where: str) -> Any:
        if not isinstance(spec, dict) or set(spec) != {"shape", "dtype", "backend"}:
            self.fail(where, "an array needs exactly {'shape', 'dtype', 'backend'}")
        shape, dtype, backend = spec["shape"], spec["dtype"], spec["backend"]
        if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                                  for n in shape):
            self.fail(where, f"shape {shape!r} is not a list of non-negative integers")
        if dtype not in _DTYPES:
            self.fail(where, f"dtype {dtype!r} is not one of {sorted(_DTYPES)}")
        if backend not in ("jax", "numpy", "scalar") or (backend == "scalar" and shape):
            self.fail(where, f"backend {backend!r} is not 'jax', 'numpy' or 'scalar' (shape [])")
        self.nbytes += math.prod(shape) * np.dtype(dtype).itemsize
        self.jax64 |= backend == "jax" and np.dtype(dtype).itemsize == 8
        if backend == "jax":
            return jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype))
        if backend == "scalar":
            return np.dtype(dtype).type(0)
        return np.broadcast_to(np.zeros((), dtype), shape)  # shape and dtype without allocating them


def _short(node: Any) -> str:
    text = json.dumps(node)
    return text if len(text) < 80 else text[:77] + "..."


def _check_tree(node: Any, file: Path) -> None:
    """Every module's `__check_init__` (the loader builds modules without `__init__`)."""
    if isinstance(node, (list, tuple)):
        for v in node:
            _check_tree(v, file)
    elif isinstance(node, dict):
        for v in node.values():
            _check_tree(v, file)
    elif isinstance(node, eqx.Module):
        for f in dataclasses.fields(node):
            _check_tree(getattr(node, f.name), file)
        for klass in reversed(type(node).__mro__):
            check = klass.__dict__.get("__check_init__")
            if check is not None:
                try:
                    check(node)
                except Exception as exc:  # noqa: BLE001 - any failed check is a bad file
                    raise ModelFileError(f"{file}: {type(node).__name__}: {exc}") from exc


# -- files --------------------------------------------------------------------------------------


def save(path: str | Path, tree: Any, meta: dict | None = None) -> None:
    """Write `<path>.json` (description + `meta`) and `<path>.eqx` (arrays), each replaced atomically."""
    path = Path(path)
    document = {"format": FORMAT, "version": VERSION, **(meta or {}), "model": describe(tree)}
    text = json.dumps(document, indent=1)
    _replace(path.with_suffix(".eqx"), lambda f: eqx.tree_serialise_leaves(f, tree))
    _replace(path.with_suffix(".json"), lambda f: f.write(text.encode()))


def _replace(target: Path, write) -> None:
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


JSON_MAX_DEPTH = 64  # nesting of a config or model file's JSON (both are a few levels deep)


def read_json(path: str | Path, error: type[Exception], what: str = "file") -> Any:
    """Parse the JSON file `path`; any problem raises `error` naming the file (and line, column).

    Deeply nested JSON is refused with a clear message rather than a RecursionError here or later."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: cannot read the {what}: {exc}") from exc
    too_deep = f"{path}: JSON nested too deeply (a {what} nests at most {JSON_MAX_DEPTH} levels)"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{path}, line {exc.lineno}, column {exc.colno}: invalid JSON: {exc.msg}") from exc
    except RecursionError as exc:
        raise error(too_deep) from exc
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > JSON_MAX_DEPTH:
            raise error(too_deep)
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return value


def read_document(path: str | Path, legacy: bool = False) -> dict:
    """The checked top level of `<path>.json` (format and version); `legacy`: also accept a file of
    jcal before format 2 (its model is then read with a `like=` skeleton)."""
    file = Path(path).with_suffix(".json")
    document = read_json(file, ModelFileError, "model file")
    if legacy and isinstance(document, dict) and "structure" in document and "format" not in document:
        return document
    if not isinstance(document, dict) or document.get("format") != FORMAT or "model" not in document:
        hint = (" (a model saved by jcal before format 2: refit, or load with like=a model of that form)"
                if isinstance(document, dict) and "structure" in document else "")
        raise ModelFileError(f"{file}: not a jcal model file: expected an object with 'format': {FORMAT!r} and "
                             f"a 'model'{hint}")
    if document.get("version") != VERSION:
        raise ModelFileError(f"{file}: model file version {document.get('version')!r}; this jcal reads {VERSION}")
    return document


def load(path: str | Path, like: Any = None, check: Any = None) -> tuple[Any, dict]:
    """(model, document) from `<path>.json` + `<path>.eqx`; `like` (optional) replaces the
    described structure as the skeleton; `check(skeleton, document)` (optional) validates more
    before any array is read. See the module docstring for what is checked."""
    path = Path(path)
    json_file, eqx_file = path.with_suffix(".json"), path.with_suffix(".eqx")
    document = read_document(path, legacy=like is not None)
    builder = _Builder(json_file)
    skeleton = builder.build(document["model"], "model") if like is None else like
    if check is not None:
        check(skeleton, document)
    try:
        size = eqx_file.stat().st_size
    except OSError as exc:
        raise ModelFileError(f"{eqx_file}: cannot be read ({exc.strerror or exc})") from exc
    if builder.nbytes > size:
        raise ModelFileError(f"{eqx_file}: {size} bytes, but {json_file.name} describes {builder.nbytes} bytes "
                             "of arrays: truncated, or not this model's arrays")
    if builder.jax64 and not jax.config.jax_enable_x64:
        raise RuntimeError(f"{json_file} holds 64-bit JAX arrays, but JAX's 64-bit mode is off: call "
                           "jcal.configure() (or jax.config.update('jax_enable_x64', True)) before loading")
    with open(eqx_file, "rb") as f:
        try:
            model = eqx.tree_deserialise_leaves(f, skeleton)
        except Exception as exc:  # noqa: BLE001 - numpy/equinox raise many kinds for a bad file
            where, cause = getattr(exc, "path", ()), exc
            while cause.__cause__ is not None:  # equinox wraps the reader's error once per tree level
                cause = cause.__cause__
            raise ModelFileError(f"{eqx_file}: does not hold the arrays {json_file.name} describes (at "
                                 f"{jax.tree_util.keystr(tuple(where))}: {type(cause).__name__}: {cause})") from exc
        if f.read(1):
            raise ModelFileError(f"{eqx_file}: has bytes after the arrays {json_file.name} describes")
    _check_tree(model, json_file)
    return model, document
