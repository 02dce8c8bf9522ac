"""Sky geometry on the host (numpy): unit vectors and angular separations.

The differentiable projections used inside fits live in `jcal_models.projection`.
"""

from __future__ import annotations

import numpy as np


def unit_vectors(ra_deg: np.ndarray, dec_deg: np.ndarray) -> np.ndarray:
    """(n,) deg, (n,) deg -> (n, 3) unit vectors."""
    ra, dec = np.radians(ra_deg), np.radians(dec_deg)
    cd = np.cos(dec)
    return np.stack([cd * np.cos(ra), cd * np.sin(ra), np.sin(dec)], axis=-1)


def to_radec(xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 3) vectors (any norm > 0) -> (n,) ra in [0, 360), (n,) dec, degrees."""
    ra = np.degrees(np.arctan2(xyz[:, 1], xyz[:, 0])) % 360.0
    dec = np.degrees(np.arctan2(xyz[:, 2], np.hypot(xyz[:, 0], xyz[:, 1])))
    return ra, dec


def angle(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angular separation (rad) of (n, 3) unit vectors; accurate at tiny separations."""
    return np.arctan2(np.linalg.norm(np.cross(a, b), axis=-1), np.sum(a * b, axis=-1))
