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
    a0, a1, a2 = a[..., 0], a[..., 1], a[..., 2]
    b0, b1, b2 = b[..., 0], b[..., 1], b[..., 2]
    cross = np.sqrt((a1 * b2 - a2 * b1) ** 2 + (a2 * b0 - a0 * b2) ** 2 + (a0 * b1 - a1 * b0) ** 2)
    return np.arctan2(cross, a0 * b0 + a1 * b1 + a2 * b2)  # by components: np.cross is 3x slower
