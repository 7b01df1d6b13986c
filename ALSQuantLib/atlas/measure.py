"""Measuring in propagated regions: region masks per side, ROI statistics, the cortex core, and quality flags."""

import numpy as np
from scipy import ndimage

from .. import geometry
from ..masks import distance_near


def region_masks(labels, affine, atlas, region_names, *, template_midline_x=None):
    """Boolean masks per (region, side) for a label image in some space.

    For regions with ``split_hemisphere``, the side is decided on the label image's own x coordinate relative to
    `template_midline_x` (use labels in template space, before propagation).
    """
    masks = {}
    for name in region_names:
        region = atlas.region(name)
        if region.split_hemisphere:
            world_x = geometry.voxel_centers_world(labels.shape, affine)[..., 0]
            midline = atlas.midline_x_mm if template_midline_x is None else template_midline_x
            inside = np.isin(labels, region.labels["both"])
            masks[(name, "left")] = inside & (world_x < midline)
            masks[(name, "right")] = inside & (world_x > midline)
        else:
            for side, values in region.labels.items():
                masks[(name, side)] = np.isin(labels, values)
    return masks


def split_labels_by_hemisphere(labels, affine, atlas):
    """Give each split-hemisphere region's left and right halves their own label values (value, value + 1000)."""
    out = labels.astype(np.int32).copy()
    world_x = geometry.voxel_centers_world(labels.shape, affine)[..., 0]
    for region in atlas.regions.values():
        if region.split_hemisphere:
            for value in region.labels["both"]:
                out[(labels == value) & (world_x > atlas.midline_x_mm)] = value + 1000
    return out


def region_values(atlas, region_name, side):
    """Label values of a region's side in a label image made by `split_labels_by_hemisphere`."""
    region = atlas.region(region_name)
    if region.split_hemisphere:
        base = region.labels["both"]
        return base if side == "left" else tuple(v + 1000 for v in base)
    return region.labels[side]


PLAUSIBLE_RANGES = {"mk": (0.0, 3.0), "fa": (0.0, 1.0), "md": (0.0, 3.5e-3)}
"""Map name → (low, high): `roi_statistics` measures a voxel only where low < value ≤ high for every such map on
its grid. 0 is how a failed fit is stored (`ALSQuantLib.dki`); a negative MK or one above 3 is a fit that broke down
under noise or motion (a "black hole": on a real 3 T DWI, WLS gives MK < 0 in 3 % of the brain, some of it in high-FA
white matter); MD (mm²/s) above free water's at body temperature (3.0e-3) is not tissue."""


def plausible(maps):
    """Where every map of `maps` with a `PLAUSIBLE_RANGES` entry lies in its range and every map is finite.

    >>> plausible({"mk": np.array([1.0, 0.0, -0.2, 3.5]), "ms": np.array([0.1, 0.1, 0.1, np.nan])}).tolist()
    [True, False, False, False]
    """
    ok = None
    for name, image in maps.items():
        image = np.asarray(image)
        with np.errstate(invalid="ignore"):
            here = np.isfinite(image)
            if name in PLAUSIBLE_RANGES:
                low, high = PLAUSIBLE_RANGES[name]
                here &= (image > low) & (image <= high)
        ok = here if ok is None else ok & here
    return ok


def roi_statistics(maps, masks, *, subject="", erosion_voxels=0, fa=None, fa_threshold=0.2, kinds=None):
    """Tidy statistics: one row per region × side × map.

    Only voxels where the maps are `plausible` are measured: a voxel whose fit failed or broke down leaves every map
    of its grid, and the row counts it (``excluded``).

    Parameters
    ----------
    maps : dict name → ndarray (all on the grid of the masks)
    masks : dict (region, side) → ndarray of bool
    erosion_voxels : int
        Erode each region mask first (partial-volume control at region borders); a region that would vanish keeps
        its uneroded mask, and the row says so.
    fa : ndarray, optional
        FA on the same grid: white-matter regions keep voxels with FA ≥ `fa_threshold`.
    kinds : dict region → "white_matter" | "cortex", optional

    Returns
    -------
    list of dict with subject, region, side, map, n, excluded, mean, median, sd, iqr, eroded
    """
    valid = plausible(maps) if maps else None
    rows = []
    for (region, side), mask in masks.items():
        selected = mask.copy()
        eroded = False
        if erosion_voxels > 0:
            candidate = ndimage.binary_erosion(mask, iterations=erosion_voxels)
            if candidate.any():
                selected, eroded = candidate, True
        kind = (kinds or {}).get(region, "white_matter")
        if kind == "white_matter" and fa is not None:
            selected &= fa >= fa_threshold
        excluded = int(np.sum(selected & ~valid)) if valid is not None else 0
        if valid is not None:
            selected &= valid
        for name, values in maps.items():
            v = values[selected]
            stats = dict(n=int(v.size), excluded=excluded, mean=np.nan, median=np.nan, sd=np.nan, iqr=np.nan)
            if v.size:
                q1, q3 = np.percentile(v, [25, 75])
                stats.update(
                    mean=float(v.mean()),
                    median=float(np.median(v)),
                    sd=float(v.std(ddof=1)) if v.size > 1 else 0.0,
                    iqr=float(q3 - q1),
                )
            rows.append({"subject": subject, "region": region, "side": side, "map": name, **stats, "eroded": eroded})
    return rows


def cortex_core(region, grey_matter, voxel_size, margin_mm):
    """The part of a cortex region farther than `margin_mm` from grey matter outside it.

    A propagated cortical label misplaced along the ribbon takes in the neighbouring cortex (another gyrus, with
    other values) at its ends; this keeps its core. Plain erosion would remove the whole ribbon, which is only a
    voxel or two thick: the ribbon's sides, against CSF and white matter, are left to the grey-matter mask.
    """
    region = region & grey_matter
    if margin_mm <= 0 or not region.any():
        return region
    return distance_near(~(grey_matter & ~region), region, voxel_size, margin_mm) > margin_mm


MIN_IN_VIEW = 0.25
"""A region with less of its template volume inside the reference's field of view gets no volume ratio."""


def volume_ratios(subject_masks, subject_affine, template_masks, template_affine, in_view=None):
    """Region volume in the subject / in the template, per (region, side): a registration failure flag when far
    from 1 (brains differ by tens of percent, not by factors).

    `in_view`: (region, side) → the fraction of the template's region that falls inside the subject's field of
    view (`labeling`, through the registration): a DWI slab that holds a third of M1 compares with that third, and a
    region mostly outside it (below `MIN_IN_VIEW`) gets no ratio.
    """
    in_view = in_view or {}
    v_subject = np.prod(geometry.voxel_sizes(subject_affine))
    v_template = np.prod(geometry.voxel_sizes(template_affine))
    ratios = {}
    for key, mask in subject_masks.items():
        fraction = in_view.get(key, 1.0)
        if fraction < MIN_IN_VIEW:
            continue
        reference = template_masks[key].sum() * v_template * fraction
        ratios[key] = float(mask.sum() * v_subject / reference) if reference else float("nan")
    return ratios


def contrast_fingerprint(image):
    """Median / 99th percentile of an image's non-zero voxels: a brain FA map is mostly dim grey and white matter
    under a few bright tracts, a T1w mostly bright tissue. Scale-free (FA stored x 1000 reads as FA). Measured: FA
    templates and FA maps 0.24-0.31 (the MNI FA template, subjects from real anatomy, real DWI), T1w templates
    0.51-0.77 (Eve, MNI152 NLin6, MNI152 2009a); our phantom's FA 0.69-0.75, as its white matter is one value.

    >>> round(contrast_fingerprint(np.array([0.0, 0.2, 0.2, 0.3, 0.9])), 2)  # 0.25 / 0.882
    0.28
    """
    values = np.asarray(image, dtype=float)
    values = values[np.isfinite(values) & (values != 0)]
    return float(np.median(values) / np.percentile(values, 99)) if values.size else float("nan")


QUALITY_LIMITS = {
    "max_contrast_difference": 0.15,
    "min_similarity": 0.5,
    "ratio_range": (0.5, 2.0),
    "min_grey_share": 0.25,
    "max_outside_brain": 0.1,
    "min_local_similarity": 0.75,
}
"""Where `quality_flags` draws the line. ``max_contrast_difference``: between the reference's and the template's
`contrast_fingerprint`; measured 0.01-0.06 for FA against an FA template (real anatomy, phantom), 0.25-0.51 for FA
against a T1w template. ``min_similarity``: the registered reference's correlation with the template;
``ratio_range``: region volume / the template's; ``min_grey_share``: the fraction of a cortex region's voxels in
the segmented grey matter; ``max_outside_brain``: the fraction of a GRE map's voxels outside the template's brain
(`outside_brain_shares`); ``min_local_similarity``: the reference's correlation with the template brought onto it,
near each white-matter region (`local_similarity`).

Local similarity, measured on real-anatomy subjects (reduced grids, WLS FA of the simulated DWI, FA registered to the
MNI FA template): 0.923-0.937 within 5 mm of the CST where the subject's FA follows a real FA map (10 subjects,
CST Dice 0.87-0.90; 0.90-0.91 on the study's grids); 0.652-0.697 where it has one value per tissue class, no tract
contrast (CST Dice 0.40-0.41, which the other checks passed). The phantom: 0.80-0.88 (35 demo subjects). Not
measured on a real whole-brain subject DWI (none is at hand): a single subject's FA is noisier than these, hence a
limit well below 0.93."""


def outside_brain_shares(maps, brain):
    """Map name → the fraction of the map's measured voxels (finite and non-zero) that lie outside `brain` (the
    template's brain, widened, on the maps' grid): a QSM mask that kept the scalp, the skull or the neck gives a
    susceptibility map whose values in the brain are wrong too (the dipole inversion spreads the errors).

    >>> brain = np.zeros((4, 4, 4), bool); brain[:2] = True
    >>> chi = np.where(np.arange(4)[:, None, None] < 3, 0.1, np.nan) * np.ones((4, 4, 4))
    >>> outside_brain_shares({"ms": chi}, brain)
    {'ms': 0.3333333333333333}
    """
    shares = {}
    for name, image in maps.items():
        measured = np.isfinite(image) & (image != 0)
        shares[name] = float((measured & ~brain).sum() / measured.sum()) if measured.any() else 0.0
    return shares


def local_similarity(reference, template, masks, voxel_size, *, near_mm=5.0, min_voxels=50):
    """(region, side) → the correlation of `reference` with `template` (brought onto the reference's grid) over the
    voxels within `near_mm` of the region where both are non-zero; NaN with fewer than `min_voxels` (e.g. outside a
    slab's view). A region placed where the template does not match the subject (a registration that failed
    there, or a subject FA without tract contrast) shows it here, where a whole-brain correlation dilutes it.

    >>> reference = np.zeros((20, 20, 20)); reference[5:15, 5:15, 5:15] = np.arange(10)[:, None, None] + 1.0
    >>> region = np.zeros(reference.shape, bool); region[9:11, 9:11, 9:11] = True
    >>> local_similarity(reference, 2 * reference, {("CST", "left"): region}, (1, 1, 1))
    {('CST', 'left'): 1.0}
    """
    found = {}
    for key, region in masks.items():
        near = ndimage.distance_transform_edt(~region, sampling=voxel_size) <= near_mm if region.any() else region
        near = near & (reference != 0) & (template != 0) & np.isfinite(reference) & np.isfinite(template)
        found[key] = float(np.corrcoef(reference[near], template[near])[0, 1]) if near.sum() >= min_voxels else np.nan
    return {key: round(value, 6) for key, value in found.items()}


def quality_flags(
    similarity, ratios, contrast=None, grey_shares=None, outside_brain=None, local=None, limits=QUALITY_LIMITS
):
    """Reasons to distrust a labelling: a template of another contrast than the reference (`contrast`:
    ``reference`` and ``template`` → `contrast_fingerprint`), low template similarity (`Registration.similarity`),
    region volumes far from the template's, a cortex region mostly outside the segmented grey matter (`grey_shares`:
    (region, side, space) → fraction), a map measured well beyond the brain (`outside_brain`: map name → fraction,
    `outside_brain_shares`), a white-matter region where the template does not match the subject (`local`:
    (region, side) → `local_similarity`).

    Registering FA to a T1w template runs without error and puts the CST 0.45-0.5 Dice off (against 0.87-0.89 FA to
    FA, subjects from real anatomy), yet passes the other two checks (correlation 0.85 against 0.95, volumes
    0.8-1.0 x): only the contrast check catches it. A label's share of its own tissue (CST in FA >= 0.2, M1 in grey
    matter) was measured too and does not separate them (CST 0.93 good, 0.96 bad)."""
    flags = []
    if contrast:
        reference, template = contrast["reference"], contrast["template"]
        if abs(reference - template) > limits["max_contrast_difference"]:
            flags.append(
                f"the template's contrast differs from the reference's (median/99th percentile {template:.2f} "
                f"against {reference:.2f}): registered across contrasts, e.g. FA to a T1w template"
            )
    if similarity < limits["min_similarity"]:
        flags.append(f"template correlation after registration {similarity:.2f} < {limits['min_similarity']}")
    low, high = limits["ratio_range"]
    for (region, side), ratio in ratios.items():
        if not low <= ratio <= high:
            flags.append(f"{region} {side} volume is {ratio:.2f} x the template's")
    for (region, side, space), share in (grey_shares or {}).items():
        if share < limits["min_grey_share"]:
            flags.append(
                f"{region} {side} in {space} space: only {share:.0%} of its voxels lie in the segmented grey matter "
                "(a failed grey-matter segmentation or a misplaced region)"
            )
    for (region, side), value in (local or {}).items():
        if value < limits["min_local_similarity"]:  # NaN (too few voxels in view) is not judged
            flags.append(
                f"{region} {side}: the template matches the reference poorly around it (correlation {value:.2f} < "
                f"{limits['min_local_similarity']}): a registration that failed there, or a reference without the "
                "tract contrast the template has"
            )
    for name, share in (outside_brain or {}).items():
        if share > limits["max_outside_brain"]:
            flags.append(
                f"{share:.0%} of the {name} map's voxels lie outside the template's brain: its mask holds the scalp, "
                "skull or neck, which spoils the values inside the brain too; give a brain mask (--gre-mask)"
            )
    return flags
