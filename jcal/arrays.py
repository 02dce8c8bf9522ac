"""Integer-array helpers shared by input reading, association and the solver's layout."""

from __future__ import annotations

import numpy as np


def unique_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct rows of an (n, k) integer array, as `np.unique(rows, axis=0, return_index=True,
    return_inverse=True)` gives them but several times faster: (first, inverse), the index of
    each distinct row's first occurrence in lexicographic row order, and each row's position
    among them. Each row becomes one int64 code, ordered like the rows, and the codes are made
    unique (`np.unique(axis=0)` sorts rows as structured records, much more slowly)."""
    rows = np.asarray(rows)
    n = rows.shape[0]
    code, span = np.zeros(n, np.int64), 1
    for column in rows.T:
        if n and (column.min() < 0 or column.max() >= 4 * n):  # sparse or negative ids: rank them
            column = np.unique(column, return_inverse=True)[1].ravel()
        size = int(column.max(initial=0)) + 1
        span *= size
        if span >= 2**62:  # too many combinations for one int64
            _, first, inverse = np.unique(rows, axis=0, return_index=True, return_inverse=True)
            return first, inverse.ravel()
        code = code * size + column
    _, first, inverse = np.unique(code, return_index=True, return_inverse=True)
    return first, inverse.ravel()
