"""Association: which detections are the same star, and which reference star is it?

`associate` turns an `InputData` into an `Association`: the list of measurements the fit
will use (rows of `data.sources`), grouped into fitted stars, each optionally tied to one
row of the reference catalog. It runs once, on the host, before any model exists, so it
only has the first-guess WCSs to go on; everything is vectorised numpy + scipy KD-trees so
that it scales to millions of detections.

Steps (each logs its counts at INFO on the ``jcal.associate`` logger, and records them in
`Association.counts`):

1. **Selection**: keep detections with ``instFlux / instFluxErr > config.min_snr``.
2. **Projection**: every detection goes to the sky through the first-guess WCS of its
   detector-visit (pixels are 0-based, so ``origin=0``), then, unless
   ``align_radius_arcsec`` is 0, is corrected by an alignment of each visit (shift, rotation,
   scale) and detector-visit (shift) on the reference catalog (`jcal.align`): a first guess off
   by several arcsec then matches as well as a good one.
3. **Grouping** (one detection per visit per star, independent of input order):
   friends-of-friends on 3-D unit vectors, linking each detection to its nearest (up to 16)
   detections of *other* visits within ``match_radius_arcsec``. A group that still holds
   two detections of one visit (two close stars chained together, or a doubly detected
   star) is split by re-running friends-of-friends on its members with half the radius,
   repeatedly (down to 1/64 of the radius): close-but-distinct stars separate cleanly at
   the scale of their separation. Whatever is still ambiguous after that (detections within ~1/64 of the
   radius of each other) is resolved by keeping, per visit, the detection closest to the
   group's mean position; the others are regrouped among themselves the same way.
   Detections are processed in a canonical, content-based order (visit, detector, y, x,
   flux, source id), so shuffling the input catalog only relabels the result.
   Stars are numbered by their first detection in that order, so even the numbering is
   reproducible.
4. **Reference matching**: reference positions are carried to each star's mean epoch with
   their proper motion (when present), then each star takes its nearest reference star
   within ``ref_match_radius_arcsec``; if several stars claim the same reference star the
   nearest keeps it and the others stay unmatched (one-to-one, no second choices: a loser
   is usually a blend or a spurious detection). Proper motions are used for matching
   whenever pmra/pmdec are finite, whatever `config.proper_motion` says: it only decides
   whether the fit models them. The reference stars considered are those on or near the
   detector-visits with selected detections. Every group is matched, then groups with fewer than
   ``config.min_measurements`` points are dropped: detections, plus the reference star when
   ``config.reference_counts`` (so a star seen once but matched is kept: at a survey's edge these
   are all that constrain a detector; jointcal counts detections only).
5. **Checks**: clear `InputError`s for input that cannot be fitted (nothing selected, a
   single visit, no overlap between visits, no reference match at all); warnings name the
   detector-visits whose detections associate with nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from jcal.align import Alignment, align
from jcal.arrays import unique_rows
from jcal.config import FitConfig
from jcal.data import InputData, InputError
from jcal.sky import angle, to_radec, unit_vectors  # noqa: F401  (re-exported)

__all__ = ["Association", "associate"]

log = logging.getLogger("jcal.associate")

_ARCSEC = np.pi / (180.0 * 3600.0)  # radians per arcsec
_MAS = _ARCSEC / 1000.0
_SPLIT_HALVINGS = 6  # split ambiguous groups down to radius / 2**6 before the fallback rule
_MAX_NEIGHBOURS = 16  # friends-of-friends links per detection (nearest first)
_QUERY_CHUNK = 1 << 18  # detections per KD-tree query batch
_REF_CANDIDATES = 8  # nearest reference stars examined per fitted star (slow movers)
_MAX_NAMED = 20  # detector-visits named in one warning


@dataclass(frozen=True, eq=False)
class Association:
    """Measurements grouped into stars, stars matched to the reference catalog.

    ``m`` measurements, ``n`` stars, ``v`` visits, ``d`` detectors, ``k`` detector-visits.
    Measurements are sorted by (star, visit). All index arrays are int64.
    """

    source_index: np.ndarray  # (m,) row of data.sources
    star: np.ndarray  # (m,) in [0, n)
    visit_index: np.ndarray  # (m,) into `visits`
    detector_index: np.ndarray  # (m,) into `detectors`
    ccd_visit_index: np.ndarray  # (m,) into `ccd_visits`
    ra: np.ndarray  # (m,) deg, first-guess WCS position of each measurement
    dec: np.ndarray  # (m,) deg
    visits: np.ndarray  # (v,) sorted unique visit ids with measurements
    detectors: np.ndarray  # (d,) sorted unique detector ids with measurements
    ccd_visits: np.ndarray  # (k, 2) sorted unique (visit, detector) pairs with measurements
    star_ra: np.ndarray  # (n,) deg, mean first-guess position
    star_dec: np.ndarray  # (n,) deg
    star_epoch: np.ndarray  # (n,) decimal year, mean epoch of the star's measurements
    star_ref: np.ndarray  # (n,) row of data.refcat, or -1
    star_ref_ra: np.ndarray  # (n,) deg, reference position carried to star_epoch (NaN if none)
    star_ref_dec: np.ndarray  # (n,) deg
    star_ref_ra_err: np.ndarray  # (n,) mas on the sky (config.reference_error_mas if set; NaN if none)
    star_ref_dec_err: np.ndarray  # (n,) mas
    counts: dict[str, int] = field(default_factory=dict)  # counts at each step, for logs/reports
    alignment: Alignment | None = None  # corrections applied to the first-guess positions (jcal.align)

    @property
    def n_stars(self) -> int:
        return int(self.star_ra.shape[0])

    @property
    def n_measurements(self) -> int:
        return int(self.source_index.shape[0])


# --------------------------------------------------------------------------- geometry


def _chord(angle_rad: np.ndarray | float) -> np.ndarray | float:
    """Chord length on the unit sphere of an angular separation."""
    return 2.0 * np.sin(np.minimum(np.asarray(angle_rad), np.pi) / 2.0)


def _carry(xyz: np.ndarray, pmra: np.ndarray, pmdec: np.ndarray, dt: np.ndarray) -> np.ndarray:
    """Move (n, 3) unit vectors by proper motion (mas/yr, pmra = mu_alpha cos dec) over dt (yr).

    Linear motion in the local east/north tangent plane, renormalised: pole-safe, and exact
    enough for matching (the fit itself models proper motion properly).
    """
    x, y, z = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    rho = np.hypot(x, y)
    safe = np.where(rho > 0, rho, 1.0)
    east = np.stack([-y / safe, x / safe, np.zeros_like(x)], axis=-1)  # (n, 3)
    north = np.stack([-z * x / safe, -z * y / safe, rho], axis=-1)
    step = (dt * _MAS)[:, None] * (pmra[:, None] * east + pmdec[:, None] * north)
    out = xyz + step
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def _sky_box(ra: np.ndarray, dec: np.ndarray) -> str:
    """Human-readable RA/Dec bounding box, wrap-aware in RA."""
    xyz = unit_vectors(ra, dec)
    ra0, _ = to_radec(xyz.sum(axis=0, keepdims=True))
    wrapped = (ra - ra0[0] + 180.0) % 360.0 - 180.0 + ra0[0]  # cut opposite the mean RA
    return (f"RA [{wrapped.min() % 360:.5f}, {wrapped.max() % 360:.5f}] deg, "
            f"Dec [{dec.min():.5f}, {dec.max():.5f}] deg")


def _name_list(pairs) -> str:
    pairs = [tuple(int(v) for v in p) for p in pairs]
    more = f" and {len(pairs) - _MAX_NAMED} more" if len(pairs) > _MAX_NAMED else ""
    return ", ".join(f"(visit={v}, detector={d})" for v, d in pairs[:_MAX_NAMED]) + more


# --------------------------------------------------------------------------- grouping


def _components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected-component label of each of n nodes given (p, 2) undirected edges."""
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1].astype(np.int64)


def _duplicated_groups(labels: np.ndarray, visit: np.ndarray) -> np.ndarray:
    """Labels of groups holding two or more detections of one visit."""
    order = np.lexsort((visit, labels))
    lab, vis = labels[order], visit[order]
    dup = (lab[1:] == lab[:-1]) & (vis[1:] == vis[:-1])
    return np.unique(lab[1:][dup])


def _relabel_subset(labels: np.ndarray, nodes: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Give `nodes` fresh labels: components of the `pairs` joining two of them."""
    n = labels.shape[0]
    member = np.zeros(n, dtype=bool)
    member[nodes] = True
    local = np.full(n, -1, dtype=np.int64)
    local[nodes] = np.arange(nodes.size)
    inside = pairs[member[pairs[:, 0]] & member[pairs[:, 1]]]
    sub = _components(nodes.size, local[inside])
    labels = labels.copy()
    labels[nodes] = labels.max() + 1 + sub
    return labels


def _neighbour_pairs(xyz: np.ndarray, visit: np.ndarray, chord: float) -> tuple[np.ndarray, np.ndarray]:
    """Links of the friends-of-friends graph: (p, 2) undirected pairs and their (p,) chord lengths.

    Each detection is linked to its nearest (up to _MAX_NEIGHBOURS) detections of *other*
    visits within `chord`. All pairs within the radius would number ~visits^2 per star;
    nearest neighbours keep memory linear in detections while a star's own detections,
    being each other's nearest neighbours, stay connected.
    """
    n = xyz.shape[0]
    if n == 0:
        return np.zeros((0, 2), np.int64), np.zeros(0)
    k = min(_MAX_NEIGHBOURS + 1, n)  # +1: a point is its own nearest neighbour
    tree = cKDTree(xyz)
    found, reach = [], np.full(n, np.inf)  # reach: distance of a point's k-th neighbour (inf: fewer)
    for start in range(0, n, _QUERY_CHUNK):  # bounded (chunk, k) temporaries
        stop = min(start + _QUERY_CHUNK, n)
        d, j = tree.query(xyz[start:stop], k=k, distance_upper_bound=chord * (1 + 1e-12), workers=-1)
        d, j = d.reshape(stop - start, k), j.reshape(stop - start, k)
        reach[start:stop] = d[:, -1]
        i = np.broadcast_to(np.arange(start, stop)[:, None], j.shape)
        ok = (j < n) & (d <= chord)
        i, j, d = i[ok], j[ok], d[ok]
        ok = visit[i] != visit[j]  # one visit never sees a star twice (also drops i == j)
        found.append((i[ok], j[ok], d[ok]))
    i, j, dist = (np.concatenate(parts) for parts in zip(*found))
    # an edge i > j is also found from j unless i lies beyond j's k-th neighbour: keep it only
    # then (ties kept too: a duplicate edge is harmless), which avoids sorting all edges
    keep = (i < j) | (dist >= reach[j])
    return np.stack([i[keep], j[keep]], axis=1).astype(np.int64), dist[keep]


def _group(xyz: np.ndarray, visit: np.ndarray, radius_rad: float) -> tuple[np.ndarray, int]:
    """Group detections of one star across visits; see the module docstring for the rule.

    xyz: (n, 3) unit vectors in canonical order; visit: (n,). Returns ((n,) group labels,
    number of friends-of-friends groups that had to be split).
    """
    n = xyz.shape[0]
    pairs, dist = _neighbour_pairs(xyz, visit, float(_chord(radius_rad)))
    labels = _components(n, pairs)

    bad = _duplicated_groups(labels, visit)
    n_split = int(bad.size)
    # 1) Hierarchical friends-of-friends: halve the radius within ambiguous groups.
    radius = radius_rad
    for _ in range(_SPLIT_HALVINGS):
        if bad.size == 0:
            break
        radius /= 2.0
        nodes = np.flatnonzero(np.isin(labels, bad))
        same = labels[pairs[:, 0]] == labels[pairs[:, 1]]
        labels = _relabel_subset(labels, nodes, pairs[same & (dist <= _chord(radius))])
        bad = _duplicated_groups(labels, visit)
    # 2) Fallback for near-coincident duplicates: per visit keep the detection closest to
    #    the group mean; regroup the rest among themselves (repeat until clean).
    while bad.size:
        nodes = np.flatnonzero(np.isin(labels, bad))  # (b,) ascending = canonical order
        lab = labels[nodes]
        _, inv = np.unique(lab, return_inverse=True)
        mean = np.zeros((inv.max() + 1, 3))
        np.add.at(mean, inv, xyz[nodes])
        mean /= np.linalg.norm(mean, axis=1, keepdims=True)
        d = np.sum((xyz[nodes] - mean[inv]) ** 2, axis=1)
        order = np.lexsort((nodes, d, visit[nodes], lab))  # ties -> canonical order
        lab_o, vis_o = lab[order], visit[nodes][order]
        first = np.ones(order.size, dtype=bool)
        first[1:] = (lab_o[1:] != lab_o[:-1]) | (vis_o[1:] != vis_o[:-1])
        leftover = nodes[order[~first]]
        same = labels[pairs[:, 0]] == labels[pairs[:, 1]]
        labels = _relabel_subset(labels, leftover, pairs[same])
        bad = _duplicated_groups(labels, visit)
    # Keep groups connected (dropping detections from a chain can disconnect it).
    same = labels[pairs[:, 0]] == labels[pairs[:, 1]]
    labels = _components(n, pairs[same])
    # Canonical star numbering: by the first (canonical) detection of each star.
    _, first_idx, inv = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(first_idx.size, dtype=np.int64)
    rank[np.argsort(first_idx)] = np.arange(first_idx.size)
    return rank[inv.reshape(-1)], n_split


# --------------------------------------------------------------------------- steps


def _project(data: InputData, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First-guess sky position (deg) of source rows, sorted by (visit, detector)."""
    src = data.sources
    visit, detector = src.visit[rows], src.detector[rows]
    ra = np.empty(rows.size)
    dec = np.empty(rows.size)
    keys = np.stack([visit, detector], axis=1)
    starts = np.flatnonzero(np.r_[True, np.any(keys[1:] != keys[:-1], axis=1)])
    ends = np.r_[starts[1:], rows.size]
    for s, e in zip(starts, ends):
        wcs = data.ccd_visits[(int(visit[s]), int(detector[s]))].wcs
        ra[s:e], dec[s:e] = wcs.all_pix2world(src.x[rows[s:e]], src.y[rows[s:e]], 0)
    return ra, dec


def _collect_references(data: InputData, ccd_keys: np.ndarray,
                        ref_xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reference stars on (and near) the detector-visits with selected detections.

    ccd_keys: (k, 2) (visit, detector) pairs. A cap around each detector (centre to
    farthest corner, +10%) picks candidates ("near", used for matching so that stars at a
    detector edge keep their reference star), whose pixel position through the first-guess
    WCS is then checked against the detector bounds ("inside", the footprint count).
    Returns ((r,) bool inside, (r,) bool near).
    """
    inside = np.zeros(ref_xyz.shape[0], dtype=bool)
    near = np.zeros(ref_xyz.shape[0], dtype=bool)
    tree = cKDTree(ref_xyz)
    for visit, detector in ccd_keys.tolist():
        ccd = data.ccd_visits[(visit, detector)]
        px = np.array([(ccd.nx - 1) / 2, -0.5, ccd.nx - 0.5, -0.5, ccd.nx - 0.5])
        py = np.array([(ccd.ny - 1) / 2, -0.5, -0.5, ccd.ny - 0.5, ccd.ny - 0.5])
        cxyz = unit_vectors(*ccd.wcs.all_pix2world(px, py, 0))
        if not np.all(np.isfinite(cxyz)):
            continue
        cap = 1.1 * angle(cxyz[:1], cxyz[1:]).max()
        cand = np.asarray(tree.query_ball_point(cxyz[0], float(_chord(cap))), dtype=np.int64)
        near[cand] = True
        cand = cand[~inside[cand]]
        if cand.size == 0:
            continue
        ra, dec = to_radec(ref_xyz[cand])
        x, y = ccd.wcs.all_world2pix(ra, dec, 0, quiet=True)
        on = (x >= -0.5) & (x <= ccd.nx - 0.5) & (y >= -0.5) & (y <= ccd.ny - 0.5)
        inside[cand[on]] = True
    return inside, near


def _first_of_runs(sorted_keys: np.ndarray) -> np.ndarray:
    """(c,) bool: True at the first element of each run of equal keys."""
    first = np.ones(sorted_keys.shape[0], dtype=bool)
    first[1:] = sorted_keys[1:] != sorted_keys[:-1]
    return first


def _match_references(star_xyz: np.ndarray, star_epoch: np.ndarray, ref_xyz: np.ndarray,
                      ref_epoch: np.ndarray, pmra: np.ndarray, pmdec: np.ndarray,
                      radius_rad: float) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one nearest-neighbour match of stars to references at the stars' epochs.

    star_xyz (n, 3), star_epoch (n,); ref_* (r,) with NaN proper motion where unknown.
    Returns ((n,) reference row or -1, (n, 3) matched reference vector at star epoch).
    """
    n = star_xyz.shape[0]
    has_pm = np.isfinite(pmra) & np.isfinite(pmdec)
    pmra, pmdec = np.where(has_pm, pmra, 0.0), np.where(has_pm, pmdec, 0.0)
    # Candidates are searched with references carried to the middle epoch; a reference
    # moving less than the match radius over half the span ("slow") is then within twice the
    # radius of its stars, faster ones get their own search radius.
    mid = 0.5 * (star_epoch.min() + star_epoch.max())
    half_span = 0.5 * (star_epoch.max() - star_epoch.min())
    ref_mid = _carry(ref_xyz, pmra, pmdec, mid - ref_epoch)
    drift = np.hypot(pmra, pmdec) * _MAS * half_span  # (r,) rad
    slow = np.flatnonzero(drift <= radius_rad)
    fast = np.flatnonzero(drift > radius_rad)

    cand_star, cand_ref = [], []
    if slow.size:
        k = min(_REF_CANDIDATES, slow.size)
        _, idx = cKDTree(ref_mid[slow]).query(star_xyz, k=k, distance_upper_bound=float(_chord(2 * radius_rad)),
                                              workers=-1)
        idx = idx.reshape(n, k)
        ok = idx < slow.size
        cand_star.append(np.nonzero(ok)[0])
        cand_ref.append(slow[idx[ok]])
    if fast.size:
        hits = cKDTree(star_xyz).query_ball_point(ref_mid[fast], _chord(radius_rad + drift[fast]))
        lengths = np.array([len(h) for h in hits], dtype=np.int64)
        cand_star.append(np.concatenate([np.asarray(h, dtype=np.int64) for h in hits] + [np.zeros(0, np.int64)]))
        cand_ref.append(np.repeat(fast, lengths))
    cs = np.concatenate(cand_star) if cand_star else np.zeros(0, np.int64)
    cr = np.concatenate(cand_ref) if cand_ref else np.zeros(0, np.int64)

    moved = _carry(ref_xyz[cr], pmra[cr], pmdec[cr], star_epoch[cs] - ref_epoch[cr])  # (c, 3)
    sep = angle(star_xyz[cs], moved)
    keep = sep <= radius_rad
    cs, cr, sep, moved = cs[keep], cr[keep], sep[keep], moved[keep]
    # Each star's nearest reference ...
    o = np.lexsort((cr, sep, cs))
    o = o[_first_of_runs(cs[o])]
    # ... and each reference keeps only its nearest claimant.
    o = o[np.lexsort((cs[o], sep[o], cr[o]))]
    o = o[_first_of_runs(cr[o])]
    star_ref = np.full(n, -1, dtype=np.int64)
    star_ref[cs[o]] = cr[o]
    ref_at_star = np.full((n, 3), np.nan)
    ref_at_star[cs[o]] = moved[o]
    return star_ref, ref_at_star


# --------------------------------------------------------------------------- main entry


def ccd_visits_not_fitted(data: InputData, a: Association, config: FitConfig) -> list[dict]:
    """Every detector-visit of the input without a fitted model, each with the reason."""
    fitted = {tuple(k) for k in a.ccd_visits.tolist()}
    src = data.sources
    keys = src.visit.astype(np.int64) * (1 << 32) + src.detector.astype(np.int64)
    total = dict(zip(*np.unique(keys, return_counts=True)))
    sel = src.inst_flux / src.inst_flux_err > config.min_snr
    selected = dict(zip(*np.unique(keys[sel], return_counts=True)))
    out = []
    for v, d in sorted(data.ccd_visits):
        if (v, d) in fitted:
            continue
        key = v * (1 << 32) + d
        if not total.get(key):
            reason = "no detection in the source catalog"
        elif not selected.get(key):
            reason = f"no detection with S/N > min_snr = {config.min_snr:g} ({total[key]} detections)"
        else:
            reason = (f"none of its {selected[key]} selected detections belongs to a star seen in another visit "
                      "or matched to a reference star (or its first-guess WCS gives no finite position)")
        out.append({"visit": int(v), "detector": int(d), "reason": reason})
    return out




def associate(data: InputData, config: FitConfig, project=None) -> Association:
    """Select, group and reference-match the detections of `data`; see the module docstring.

    project: optional callable (source rows, visit ids, detector ids) -> (ra, dec) deg giving the sky
        positions to associate (e.g. through a fitted map, to re-associate after a fit) instead of
        the first-guess WCSs and their alignment.

    Raises InputError when the input cannot support a fit (nothing selected, fewer than two
    visits, visits that do not overlap, or no star matching the reference catalog).
    """
    src, ref = data.sources, data.refcat
    counts: dict[str, int] = {"sources_total": len(src)}

    # 1. Selection.
    snr = src.inst_flux / src.inst_flux_err
    selected = np.flatnonzero(snr > config.min_snr)
    counts["sources_selected"] = int(selected.size)
    log.info("selection: %d of %d detections have S/N > %g (%d dropped)",
             selected.size, len(src), config.min_snr, len(src) - selected.size)
    if selected.size == 0:
        raise InputError(
            f"no detection passes the source selection instFlux/instFluxErr > min_snr = {config.min_snr:g} "
            f"(0 of {len(src)} kept; the highest S/N in the catalog is {np.max(snr):.3g})"
        )
    # Canonical, content-based order (primary key last): the result must not depend on
    # the input row order.
    rows = selected[np.lexsort((src.source_id[selected], src.inst_flux[selected], src.x[selected],
                                src.y[selected], src.detector[selected], src.visit[selected]))]
    visit, detector = src.visit[rows], src.detector[rows]
    visit_ids = np.unique(visit)
    if visit_ids.size < 2:
        raise InputError(
            f"fewer than 2 visits have selected detections (only visit(s) {visit_ids.tolist()}): "
            "a joint calibration needs overlapping visits"
        )

    # 2. Projection with the first-guess WCSs.
    ra, dec = _project(data, rows) if project is None else project(rows, visit, detector)
    finite = np.isfinite(ra) & np.isfinite(dec)
    if not finite.all():
        bad_keys = np.stack([visit[~finite], detector[~finite]], axis=1)
        bad_keys = bad_keys[unique_rows(bad_keys)[0]]
        log.warning("%d selected detection(s) have no finite first-guess sky position and are dropped; "
                    "detector-visit(s): %s", int((~finite).sum()), _name_list(bad_keys))
        rows, visit, detector, ra, dec = rows[finite], visit[finite], detector[finite], ra[finite], dec[finite]
    counts["sources_projected"] = int(rows.size)
    alignment = None
    if config.align_radius_arcsec > 0 and project is None:  # first guesses off by more than the match radius: align them first
        keys = np.stack([visit, detector], axis=1)
        first, ccd_of = unique_rows(keys)
        alignment = align(visit, ccd_of, keys[first], ra, dec, data.visits.visit, data.visits.epoch, ref.ra, ref.dec,
                          ref.epoch, ref.pmra, ref.pmdec, config.align_radius_arcsec)
        ra, dec = alignment.apply(visit, ccd_of, ra, dec)
    xyz = unit_vectors(ra, dec)  # (s, 3)

    # 3. Grouping.
    radius = config.match_radius_arcsec * _ARCSEC
    labels, n_split = _group(xyz, visit, radius)
    n_groups = int(labels.max()) + 1
    size = np.bincount(labels, minlength=n_groups)  # detections = visits, per group
    counts["stars_grouped"] = n_groups
    counts["groups_split"] = n_split
    log.info("grouping: %d detections -> %d groups within %g arcsec (%d ambiguous groups split)",
             rows.size, n_groups, config.match_radius_arcsec, n_split)
    if size.max() < 2:
        raise InputError(
            f"no star is seen in 2 or more visits: the {visit_ids.size} visits' detections do not overlap "
            f"within match_radius_arcsec = {config.match_radius_arcsec:g} (check that the visits overlap "
            "on the sky and that their first-guess WCSs are right)"
        )
    # Per-group mean position and epoch (every group: a single detection may match a reference star).
    vis_order = np.argsort(data.visits.visit)
    epoch_all = data.visits.epoch[vis_order[np.searchsorted(data.visits.visit, visit, sorter=vis_order)]]
    group_xyz = np.zeros((n_groups, 3))
    np.add.at(group_xyz, labels, xyz)
    group_xyz /= np.linalg.norm(group_xyz, axis=1, keepdims=True)
    group_epoch = np.bincount(labels, weights=epoch_all, minlength=n_groups) / size

    # 4. Reference matching.
    ref_xyz = unit_vectors(ref.ra, ref.dec)  # (r, 3) at ref.epoch
    sel_keys = np.stack([visit, detector], axis=1)
    sel_keys = sel_keys[unique_rows(sel_keys)[0]]
    collected, near = _collect_references(data, sel_keys, ref_xyz)
    counts["reference_stars_total"] = len(ref)
    counts["reference_stars_collected"] = int(collected.sum())
    near_rows = np.flatnonzero(near)
    group_ref = np.full(n_groups, -1, dtype=np.int64)
    group_ref_at = np.full((n_groups, 3), np.nan)
    if near_rows.size:
        sub_ref, group_ref_at = _match_references(
            group_xyz, group_epoch, ref_xyz[near_rows], ref.epoch[near_rows], ref.pmra[near_rows],
            ref.pmdec[near_rows], config.ref_match_radius_arcsec * _ARCSEC)
        group_ref = np.where(sub_ref >= 0, near_rows[np.maximum(sub_ref, 0)], -1)

    # A star needs min_measurements points: its detections, plus its reference star if the rule says so.
    points = size + (group_ref >= 0) if config.reference_counts else size
    keep_group = points >= config.min_measurements
    counts["stars_kept"] = int(keep_group.sum())
    counts["stars_kept_single_with_reference"] = int(np.sum(keep_group & (size < 2)))
    log.info("grouping: %d stars with >= %d %s kept (%d dropped; %d of the kept seen once, with a reference star)",
             keep_group.sum(), config.min_measurements,
             "points (detections + reference)" if config.reference_counts else "detections",
             n_groups - keep_group.sum(), counts["stars_kept_single_with_reference"])
    if not keep_group.any():
        raise InputError(
            f"no star has at least min_measurements = {config.min_measurements} "
            f"{'points (detections + its reference star)' if config.reference_counts else 'detections'} "
            f"(the best-observed star has {points.max()})"
        )
    # Renumber kept stars in canonical order and sort measurements by (star, visit).
    new_label = np.cumsum(keep_group) - 1
    m_keep = keep_group[labels]
    star = new_label[labels[m_keep]]
    order = np.lexsort((visit[m_keep], star))
    sel_idx = np.flatnonzero(m_keep)[order]  # (m,) into the selected/canonical arrays
    star = star[order]
    m_rows, m_visit, m_detector = rows[sel_idx], visit[sel_idx], detector[sel_idx]
    m_ra, m_dec = ra[sel_idx], dec[sel_idx]
    n_stars = int(keep_group.sum())
    star_xyz, star_epoch = group_xyz[keep_group], group_epoch[keep_group]
    star_ra, star_dec = to_radec(star_xyz)
    star_ref, ref_at_star = group_ref[keep_group], group_ref_at[keep_group]
    matched = star_ref >= 0
    counts["reference_stars_matched"] = int(matched.sum())
    log.info("reference: %d of %d reference stars in the footprint; %d stars matched within %g arcsec",
             collected.sum(), len(ref), matched.sum(), config.ref_match_radius_arcsec)
    if not matched.any():
        _, nearest = cKDTree(ref_xyz).query(xyz, workers=-1)
        med = np.median(angle(xyz, ref_xyz[nearest])) / _ARCSEC
        raise InputError(
            f"no star matches the reference catalog within ref_match_radius_arcsec = "
            f"{config.ref_match_radius_arcsec:g}: the first-guess WCS probably misses the refcat. "
            f"The median distance from a detection to its nearest reference star is {med:.3g} arcsec; "
            f"detections cover {_sky_box(ra, dec)}, the reference catalog covers {_sky_box(ref.ra, ref.dec)}"
            f" ({collected.sum()} reference stars fall on the detectors)"
        )
    star_ref_ra, star_ref_dec = np.full(n_stars, np.nan), np.full(n_stars, np.nan)
    star_ref_ra[matched], star_ref_dec[matched] = to_radec(ref_at_star[matched])
    star_ref_ra_err, star_ref_dec_err = np.full(n_stars, np.nan), np.full(n_stars, np.nan)
    if config.reference_error_mas is not None:
        star_ref_ra_err[matched] = star_ref_dec_err[matched] = config.reference_error_mas
    else:
        star_ref_ra_err[matched] = ref.ra_err[star_ref[matched]]
        star_ref_dec_err[matched] = ref.dec_err[star_ref[matched]]

    # Indices of the kept measurements.
    visits_u, visit_index = np.unique(m_visit, return_inverse=True)
    detectors_u, detector_index = np.unique(m_detector, return_inverse=True)
    m_keys = np.stack([m_visit, m_detector], axis=1)
    first, ccd_index = unique_rows(m_keys)
    ccd_u = m_keys[first]
    counts["measurements"] = int(m_rows.size)
    counts["measurements_with_reference"] = int(matched[star].sum())
    counts["visits"] = int(visits_u.size)
    counts["detectors"] = int(detectors_u.size)
    counts["ccd_visits"] = int(ccd_u.shape[0])
    log.info("association: %d measurements of %d stars (%d with a reference star) on %d detector-visits "
             "(%d visits, %d detectors)", m_rows.size, n_stars, matched.sum(), ccd_u.shape[0],
             visits_u.size, detectors_u.size)

    # 5. Warnings naming detector-visits whose detections associate with nothing.
    kept_keys = {tuple(k) for k in ccd_u.tolist()}
    lonely = [k for k in sel_keys.tolist() if tuple(k) not in kept_keys]
    if lonely:
        log.warning("%d detector-visit(s) have selected detections that match no other visit: %s",
                    len(lonely), _name_list(lonely))
    ccd_index = ccd_index.reshape(-1)
    with_ref = np.bincount(ccd_index, weights=matched[star], minlength=ccd_u.shape[0])
    no_ref = ccd_u[with_ref == 0]
    if no_ref.shape[0]:
        log.warning("%d detector-visit(s) have no measurement matched to the reference catalog "
                    "(first-guess WCS off?): %s", no_ref.shape[0], _name_list(no_ref))

    out = Association(
        source_index=m_rows.astype(np.int64),
        star=star.astype(np.int64),
        visit_index=visit_index.reshape(-1).astype(np.int64),
        detector_index=detector_index.reshape(-1).astype(np.int64),
        ccd_visit_index=ccd_index.astype(np.int64),
        ra=m_ra,
        dec=m_dec,
        visits=visits_u.astype(np.int64),
        detectors=detectors_u.astype(np.int64),
        ccd_visits=ccd_u.astype(np.int64).reshape(-1, 2),
        star_ra=star_ra,
        star_dec=star_dec,
        star_epoch=star_epoch,
        star_ref=star_ref,
        star_ref_ra=star_ref_ra,
        star_ref_dec=star_ref_dec,
        star_ref_ra_err=star_ref_ra_err,
        star_ref_dec_err=star_ref_dec_err,
        counts=counts,
        alignment=alignment,
    )
    missing = ccd_visits_not_fitted(data, out, config)
    if missing:  # never a silent hole: each is named in metrics.json too (ccd_visits_not_fitted)
        log.warning("%d detector-visit(s) get no calibration: %s", len(missing), "; ".join(
            f"(visit={m['visit']}, detector={m['detector']}): {m['reason']}" for m in missing[:_MAX_NAMED])
            + (f"; and {len(missing) - _MAX_NAMED} more" if len(missing) > _MAX_NAMED else ""))
    return out
