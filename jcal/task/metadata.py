"""`TaskMetadata`: a hierarchical, JSON-serialisable metadata container (like lsst.pipe.base's).

Dotted keys address nested levels: ``md["a.b"] = 1`` makes ``md["a"]["b"] == 1``. `add`
appends to a list, as ``PropertySet.add`` does.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

__all__ = ["TaskMetadata"]


def _plain(value):
    if isinstance(value, TaskMetadata):
        return value.to_dict()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    return value


class TaskMetadata:
    def __init__(self, values: dict[str, Any] | None = None):
        self._data: dict[str, Any] = {}
        for k, v in (values or {}).items():
            self[k] = TaskMetadata(v) if isinstance(v, dict) else v

    def _split(self, key: str, create: bool):
        *heads, last = key.split(".")
        node = self
        for h in heads:
            child = node._data.get(h)
            if not isinstance(child, TaskMetadata):
                if not create:
                    raise KeyError(key)
                child = node._data[h] = TaskMetadata()
            node = child
        return node, last

    def __setitem__(self, key: str, value: Any) -> None:
        node, last = self._split(key, True)
        node._data[last] = TaskMetadata(value) if isinstance(value, dict) else value

    def __getitem__(self, key: str) -> Any:
        node, last = self._split(key, False)
        return node._data[last]

    def __contains__(self, key: str) -> bool:
        try:
            self[key]
        except KeyError:
            return False
        return True

    def get(self, key: str, default=None):
        return self[key] if key in self else default

    def add(self, key: str, value: Any) -> None:
        """Append `value` to the list at `key` (creating it)."""
        node, last = self._split(key, True)
        cur = node._data.get(last)
        node._data[last] = (cur if isinstance(cur, list) else ([] if cur is None else [cur])) + [value]

    def set(self, key, value):
        self[key] = value

    def names(self) -> list[str]:
        return list(self._data)

    keys = names

    def items(self):
        return self._data.items()

    def __len__(self) -> int:
        return len(self._data)

    def __iter__(self):
        return iter(self._data)

    def clear(self) -> None:
        self._data.clear()

    def to_dict(self) -> dict[str, Any]:
        return {k: _plain(v) for k, v in self._data.items()}

    def json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "TaskMetadata":
        return cls(json.loads(text))

    def __eq__(self, other):
        return isinstance(other, TaskMetadata) and self.to_dict() == other.to_dict()

    def __repr__(self):
        return f"TaskMetadata({self.to_dict()!r})"
