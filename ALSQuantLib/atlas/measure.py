"""Measuring in propagated regions: region masks per side, ROI statistics, the cortex core, and quality flags."""

import numpy as np
from scipy import ndimage

from .. import geometry


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


def roi_statistics(maps, masks, *, subject="", erosion_voxels=0, fa=None, fa_threshold=0.2, kinds=None):
    """Tidy statistics: one row per region × side × map.

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
    list of dict with subject, region, side, map, n, mean, median, sd, iqr, eroded
    """
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
        for name, values in maps.items():
            v = values[selected]
            v = v[np.isfinite(v)]
            stats = dict(n=int(v.size), mean=np.nan, median=np.nan, sd=np.nan, iqr=np.nan)
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
    distance = ndimage.distance_transform_edt(~(grey_matter & ~region), sampling=voxel_size)
    return region & (distance > margin_mm)


def volume_ratios(subject_masks, subject_affine, template_masks, template_affine):
    """Region volume in the subject / in the template, per (region, side): a registration failure flag when far
    from 1 (brains differ by tens of percent, not by factors)."""
    v_subject = np.prod(geometry.voxel_sizes(subject_affine))
    v_template = np.prod(geometry.voxel_sizes(template_affine))
    ratios = {}
    for key, mask in subject_masks.items():
        reference = template_masks[key].sum() * v_template
        ratios[key] = float(mask.sum() * v_subject / reference) if reference else float("nan")
    return ratios


def quality_flags(similarity, ratios, *, min_similarity=0.5, ratio_range=(0.5, 2.0)):
    """Reasons to distrust a registration: low template similarity (`Registration.similarity`), or region volumes
    far from the template's."""
    flags = []
    if similarity < min_similarity:
        flags.append(f"template correlation after registration {similarity:.2f} < {min_similarity}")
    for (region, side), ratio in ratios.items():
        if not ratio_range[0] <= ratio <= ratio_range[1]:
            flags.append(f"{region} {side} volume is {ratio:.2f} x the template's")
    return flags
