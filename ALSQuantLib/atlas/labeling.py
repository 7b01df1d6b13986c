"""The labelling of one subject, as named steps: check every input and grid, find the grey matter, register and
propagate the labels, restrict cortex regions, measure, and judge the registration."""

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from .. import geometry, io, masks
from ..errors import InputError
from ..options import check_choices, option
from ..progress import report as report_progress
from ..registration import register
from .composite import combine_atlases
from .definitions import ATLAS_COMBINATIONS, BUILTIN_ATLASES, load_regions_json
from .measure import (
    contrast_fingerprint,
    cortex_core,
    local_similarity,
    outside_brain_shares,
    quality_flags,
    region_masks,
    region_values,
    roi_statistics,
    split_labels_by_hemisphere,
    volume_ratios,
)
from .registration import bias_corrected, propagate_labels, template_points_to_subject, warp_to_subject
from .sources import find_atlas
from .tables import LabelTable

log = logging.getLogger(__name__)

ATLAS_SOURCES_HELP = (
    "JSON naming a URL and SHA-256 for each atlas file, or 'official' for the addresses built in (harvard-oxford, "
    "from FSL: non-commercial licence): files missing locally are downloaded once into the cache "
    "($ALSQUANT_CACHE, default ~/.cache/alsquant) and checked"
)


SYN_ITERATIONS = (40, 20, 10)
"""SyN iterations per level (coarse to fine). antspyx's default (40, 20, 0) stops before the finest level: on
real-anatomy subjects that left CST Dice at 0.84 where (40, 20, 10) reached 0.88 (benchmarks/bench_real_anatomy.py)."""

AUTO = "auto"
FSL_ATLASES = "jhu-tracts,harvard-oxford"
"""What ``auto`` chooses when FSL's files are found: the CST's whole course from JHU's tractography atlas, M1 from
Harvard-Oxford's precentral gyrus."""


def automatic_atlas(fsldir=None):
    """`FSL_ATLASES` when an FSL installation (`fsldir`, else ``$FSLDIR``) holds their label images, else ``eve``."""
    fsldir = fsldir or os.environ.get("FSLDIR")
    if fsldir:
        paths = [Path(fsldir) / "data" / "atlases" / BUILTIN_ATLASES[n].fsl_paths[0] for n in FSL_ATLASES.split(",")]
        if all(p.is_file() for p in paths):
            return FSL_ATLASES
    return "eve"


@dataclass(frozen=True)
class LabelingOptions:
    """Which atlas, which regions, and how they are measured (`label_subject`)."""

    atlas: str = option(
        AUTO,
        "built-in atlas, or several separated by commas, each region from the first that defines it (e.g. "
        "jhu-tracts,harvard-oxford: CST from JHU tractography, M1 from Harvard-Oxford); auto: "
        f"{FSL_ATLASES} when FSL's files are found (--fsldir or $FSLDIR), else eve",
        choices=(AUTO, *BUILTIN_ATLASES, *ATLAS_COMBINATIONS),
        several=True,
    )
    atlas_dir: str = option(None, "folder holding the atlas files", path=True)
    fsldir: str = option(None, "FSL installation whose atlases and templates to use (default: $FSLDIR)", path=True)
    atlas_sources: str = option(None, ATLAS_SOURCES_HELP, path=True)
    template: str = option(None, "template image overriding the atlas's", path=True)
    template_fa: str = option(
        None, "FA template overriding the atlas's (used with an FA reference: FA registered to FA)", path=True
    )
    regions_json: str = option(None, "your own region definitions (JSON) instead of the atlas's", path=True)
    reference_contrast: str = option(
        "FA",
        "contrast of the reference: FA registers to the atlas's FA template when it has one, else to its T1w "
        "(which QC flags: across contrasts the CST lands 0.45-0.5 Dice off)",
        choices=("FA", "T1w"),
    )
    rois: tuple = option(("CST", "M1"), "regions to measure, separated by commas")
    erosion_voxels: int = option(
        0,
        "erode region masks by this many voxels before measuring",
        unit="voxels",
        flag="--roi-erosion",
        aliases=("--erosion",),
    )
    fa_threshold: float = option(0.2, "white-matter regions keep voxels with FA at least this (needs an FA map)")
    cortex_segmentation: bool = option(
        True,
        "restrict cortex regions (M1) on the GRE grid to the grey matter segmented from the GRE magnitude",
        flag="--no-cortex-segmentation",
    )
    bias_correction: bool = option(
        True,
        "remove the receive coil's intensity bias from the GRE magnitude (N4) before segmenting its grey matter; "
        "measured on real anatomy under a head coil's profile: M1 Dice on the GRE grid 0.75-0.81 without, 0.86-0.89 "
        "with",
        flag="--no-bias-correction",
    )
    cortex_margin_mm: float = option(
        3.0,
        "measure cortex regions only farther than this from the grey matter around them (0: whole)",
        unit="mm",
        flag="--cortex-margin",
    )
    registration_mm: float = option(
        2.0,
        "register to the template resampled to voxels of this size (0: as it is); measured on real anatomy: 2 mm "
        "is both faster and closer than the templates' own 1-1.25 mm grids",
        unit="mm",
    )
    link_mm: float = option(
        2.0,
        "link the GRE to the reference (rigid) on the GRE magnitude resampled to voxels of this size (0: as it is); "
        "measured on real anatomy: 2 mm places M1 as well as the study's 0.5 mm grid, in half the time",
        unit="mm",
    )
    seed: int = option(0, "random seed of the registration and the grey-matter segmentation")


def atlas_for(options):
    """The atlas that `options` name, resolved to files (`find_atlas`), with ``regions_json``'s regions if given;
    several atlases are combined (`combine_atlases`: each region of ``options.rois`` from the first that defines
    it)."""
    check_choices(options)
    chosen = automatic_atlas(options.fsldir) if options.atlas == AUTO else options.atlas
    if options.atlas == AUTO:
        log.info("atlas auto: %s", chosen)
    atlases, names = [], chosen.split(",")
    for name in names:
        atlas = find_atlas(
            name.strip(),
            atlas_dir=options.atlas_dir,
            template=options.template,
            template_fa=options.template_fa,
            fsldir=options.fsldir,
            sources=options.atlas_sources,
        )
        if options.regions_json:  # with several atlases, one the file does not mention keeps its own regions
            atlas.regions = load_regions_json(options.regions_json, atlas.name, required=len(names) == 1) or (
                atlas.regions
            )
        atlases.append(atlas)
    return atlases[0] if len(atlases) == 1 else combine_atlases(atlases, options.rois)


@dataclass
class Labeling:
    """Output of `label_subject`.

    ``label_images``: space ("reference", "gre") → (label image, affine), split-hemisphere regions' right halves as
    value + 1000; ``table``: the label table naming those values; ``rows``: `roi_statistics` rows with ``space`` and
    ``qc_passed``; ``ratios``: (region, side) → volume / template volume; ``flags``: quality warnings;
    ``transforms``: the kept ANTs transform files (subject → template: affine ``.mat``, SyN warp and its inverse),
    if asked;
    ``grey_matter``: space → (mask, affine) of the grey matter that cortex regions were restricted to; ``contrast``:
    `contrast_fingerprint` of an FA reference and of its template; ``in_view``: (region, side) → the fraction of
    the template's region inside the reference's field of view (a partial DWI slab holds part of M1);
    ``grey_share``: (region, side, space) → the fraction of a cortex region's propagated voxels that lie in the grey
    matter (a failed grey-matter segmentation or a misplaced region keeps little); ``outside_brain``: map name →
    the fraction of a GRE-grid map's measured voxels outside the template's brain (`outside_brain_shares`);
    ``local_similarity``: (region, side) → the reference's correlation with the template near each white-matter
    region (`local_similarity`).
    """

    label_images: dict
    table: LabelTable
    rows: list
    ratios: dict
    flags: list
    similarity: float
    transforms: list = field(default_factory=list)
    grey_matter: dict = field(default_factory=dict)
    contrast: dict = field(default_factory=dict)
    in_view: dict = field(default_factory=dict)
    grey_share: dict = field(default_factory=dict)
    outside_brain: dict = field(default_factory=dict)
    local_similarity: dict = field(default_factory=dict)

    @property
    def passed(self):
        return not self.flags


# ----------------------------------------------------------------------------------------------------------------
# The steps
# ----------------------------------------------------------------------------------------------------------------
def _check_inputs(reference, reference_affine, atlas, rois, maps, gre_magnitude, tissue_mask):
    """Every region, map and mask checked before anything is computed; returns the grids (space → shape, affine)
    and the GRE magnitude's first echo."""
    if np.asarray(reference).ndim != 3:
        raise InputError(f"reference: expected a 3D image, got shape {np.shape(reference)}")
    for roi in rois:
        atlas.region(roi)
    grids = {"reference": (reference.shape, reference_affine)}
    gre = None
    if gre_magnitude is not None:
        gre, gre_affine = gre_magnitude
        gre = gre[..., 0] if gre.ndim == 4 else gre
        grids["gre"] = (gre.shape, gre_affine)

    def on_a_grid(image):
        return any(geometry.same_grid(np.shape(image[0]), image[1], *grid) for grid in grids.values())

    unmatched = sorted(name for name, image in maps.items() if not on_a_grid(image))
    if unmatched:
        raise InputError(f"map(s) {', '.join(unmatched)}: on neither the reference's nor the GRE's grid")
    if tissue_mask is not None and not on_a_grid(tissue_mask):
        raise InputError(f"tissue mask {np.shape(tissue_mask[0])}: on neither the reference's nor the GRE's grid")
    return grids, gre


BRAIN_MARGIN_MM = 4.0
"""How far beyond the template's brain the GRE's grey matter and a GRE map's mask may lie (`_grey_matter`,
`outside_brain_shares`): more than a registration's error, less than the skull's thickness."""


def _wants_grey_matter(options, atlas, gre, tissue_mask):
    """Whether the grey matter of the GRE magnitude is to be segmented: asked, a cortex region measured, a GRE
    given and no mask."""
    cortex = any(atlas.region(r).kind == "cortex" for r in options.rois)
    return options.cortex_segmentation and cortex and gre is not None and tissue_mask is None


def _grey_matter(options, atlas, gre, gre_affine, tissue_mask, template_brain):
    """The grey matter that cortex regions are restricted to: the mask given, else segmented from the GRE
    magnitude (`_wants_grey_matter`), bias-corrected first (``options.bias_correction``), inside its brain: the
    magnitude's own brain mask (`masks.brain_mask`) within the template's brain brought onto the GRE grid
    (`template_brain`; a threshold of the magnitude keeps the scalp and the neck, which the brainstem joins); else
    None."""
    if tissue_mask is not None:
        return np.asarray(tissue_mask[0]) > 0, tissue_mask[1]
    if not _wants_grey_matter(options, atlas, gre, tissue_mask):
        return None
    voxel_size = geometry.voxel_sizes(gre_affine)
    if options.bias_correction:
        # N4 fitted in a first, uneroded mask; the brain is then found in the corrected image (measured on real
        # anatomy under a head coil's profile: M1 kept in grey matter 0.87-0.93 of its voxels, against 0.68-0.70
        # with the mask of the uncorrected image)
        gre = bias_corrected(gre, gre_affine, masks.brain_mask(gre, voxel_size, erosion_mm=0) & template_brain)
    brain = masks.brain_mask(gre, voxel_size) & template_brain
    return masks.grey_matter_mask(gre, brain, seed=options.seed), gre_affine


def _in_view(template_masks, labels_affine, shape, affine, registration, step=2):
    """(region, side) → the fraction of the template's region whose points the registration carries inside the
    grid (`shape`, `affine`): the subject's field of view. Every `step`-th voxel along each axis is carried."""
    keys = list(template_masks)
    voxels = [np.argwhere(template_masks[key][::step, ::step, ::step]) * step for key in keys]
    points = np.concatenate(voxels) if voxels else np.zeros((0, 3))
    if not len(points):
        return {}
    world = points @ labels_affine[:3, :3].T + labels_affine[:3, 3]
    moved = template_points_to_subject(world, registration)
    ijk = (moved - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
    inside = np.all((ijk > -0.5) & (ijk < np.array(shape) - 0.5), axis=1)
    bounds = np.cumsum([0] + [len(v) for v in voxels])
    return {key: float(inside[a:b].mean()) if b > a else 0.0 for key, a, b in zip(keys, bounds[:-1], bounds[1:])}


def _atlas_template(atlas, options):
    """The template the reference registers to: (image, affine on the registration's grid, whether it is the FA
    template, its `contrast_fingerprint` at its own grid when the reference is FA, else None)."""
    use_fa = options.reference_contrast == "FA" and atlas.template_fa is not None
    template, template_affine = io.load_image(atlas.template_fa if use_fa else atlas.template, ndim=3, what="template")
    # An FA map is 0 outside the brain, so its fingerprint is the brain's; a T1w reference may hold the whole head.
    fingerprint = contrast_fingerprint(template) if options.reference_contrast == "FA" else None
    if options.registration_mm > 0:
        template, template_affine = geometry.coarsened(template, template_affine, options.registration_mm)
    return template, template_affine, use_fa, fingerprint


def _register_to_template(
    reference, reference_affine, atlas, template, template_affine, use_fa, options, workdir, progress
):
    """The reference registered to the atlas's template (rigid, affine, SyN)."""
    report_progress(progress, 0.0, f"registering to the {atlas.name} template ({'FA' if use_fa else 'T1w'}), SyN", log)
    return register(
        reference,
        reference_affine,
        template,
        template_affine,
        random_seed=options.seed,
        workdir=workdir,
        reg_iterations=SYN_ITERATIONS,
    )


def _link_gre(gre, gre_affine, reference, reference_affine, options, workdir, progress):
    """The GRE magnitude registered rigidly to the reference (the same session's other image)."""
    report_progress(progress, 0.8, "linking the GRE to the reference (rigid)", log)
    return register(
        *geometry.coarsened(gre, gre_affine, options.link_mm),  # as it is for 0
        reference,
        reference_affine,
        transform="Rigid",
        random_seed=options.seed,
        workdir=workdir,
        # One session, one scanner frame: start from the images' own placement. ANTs' default start aligns
        # centres of mass, which a head and neck around the GRE's brain (and none around the FA's) pull
        # centimetres off: on real-anatomy subjects with a head (8 subjects, 2 seeds) 4 of 16 links were
        # 6-75 mm off, and M1 lost; from the images' placement all 16 were 0.4-1.0 mm off (median).
        initial_transform="Identity",
    )


def _template_brain(template, template_affine, margin_mm, shape, affine, registration, link):
    """The template's brain (its non-zero voxels, holes filled: an FA template's ventricles may hold zeros) grown by
    `margin_mm` (shrunk if negative), on a subject grid."""
    voxel_size = geometry.voxel_sizes(template_affine)
    brain = ndimage.binary_fill_holes(template > 0)
    if margin_mm >= 0:
        brain = ndimage.distance_transform_edt(~brain, sampling=voxel_size) <= margin_mm
    else:
        brain = ndimage.distance_transform_edt(brain, sampling=voxel_size) > -margin_mm
    return propagate_labels(brain.astype(np.int32), template_affine, shape, affine, registration, link=link) > 0


def register_subject(reference, reference_affine, atlas, options=None, *, gre=None, workdir=None, progress=None):
    """The reference registered to the atlas's template (rigid, affine, SyN) and, given `gre` (image, affine: the
    GRE magnitude), the GRE linked rigidly to the reference: (registration, link or None). The caller removes their
    files (`Registration.cleanup`) or keeps them (`Registration.kept`); `template_brain_mask` and `label_subject`
    take them as they are, so that one registration serves both."""
    options = options or LabelingOptions()
    template, template_affine, use_fa, _ = _atlas_template(atlas, options)
    registration = _register_to_template(
        reference, reference_affine, atlas, template, template_affine, use_fa, options, workdir, progress
    )
    if gre is None:
        return registration, None
    try:
        return registration, _link_gre(*gre, reference, reference_affine, options, workdir, progress)
    except BaseException:
        registration.cleanup()
        raise


def template_brain_mask(gre_shape, gre_affine, atlas, registrations, options=None, *, margin_mm=0.0):
    """The atlas template's brain on the GRE's grid, through `registrations` (`register_subject` with the GRE):
    the template's non-zero voxels grown by `margin_mm` (shrunk if negative) brought back. A brain mask that a head
    around the brain cannot mislead, for the QSM (the magnitude's own threshold keeps the scalp and the neck)."""
    template, template_affine, _, _ = _atlas_template(atlas, options or LabelingOptions())
    registration, link = registrations
    return _template_brain(template, template_affine, margin_mm, gre_shape, gre_affine, registration, link)


def _register_and_propagate(
    reference,
    reference_affine,
    atlas,
    labels,
    labels_affine,
    template_masks,
    options,
    gre,
    gre_affine,
    keep_transforms,
    registrations,
    workdir,
    progress,
):
    """Register the reference to the template (unless `registrations` (registration, link) are given), bring the
    labels to the reference's (and the GRE's) grid; return (space → (labels, affine), template correlation, kept
    transform files, `contrast_fingerprint` of an FA reference and its template, each template region's fraction
    inside the reference's field of view (`_in_view`), with a GRE the template's brain (non-zero voxels) widened by
    `BRAIN_MARGIN_MM` on the GRE grid, else None, and each white-matter region's `local_similarity`)."""
    template, template_affine, use_fa, fingerprint = _atlas_template(atlas, options)
    contrast = {}
    if fingerprint is not None:
        contrast = {"reference": contrast_fingerprint(reference), "template": fingerprint}
    given = registrations is not None
    if not given:
        registrations = register_subject(
            reference,
            reference_affine,
            atlas,
            options,
            gre=(gre, gre_affine) if gre is not None else None,
            workdir=workdir,
            progress=progress,
        )
    registration, link = registrations
    try:
        if gre is not None and link is None:
            raise ValueError("registrations given without the GRE's link, and a GRE to label")
        propagated = propagate_labels(labels, labels_affine, reference.shape, reference_affine, registration)
        label_images = {"reference": (propagated, reference_affine)}
        white_matter = {
            key: np.isin(propagated, region_values(atlas, *key))
            for key in template_masks
            if atlas.region(key[0]).kind == "white_matter"
        }
        local = {}
        if white_matter:
            warped = warp_to_subject(template, template_affine, reference.shape, reference_affine, registration)
            local = local_similarity(reference, warped, white_matter, geometry.voxel_sizes(reference_affine))
        in_view = _in_view(template_masks, labels_affine, reference.shape, reference_affine, registration)
        brain = None
        if gre is not None:
            propagated = propagate_labels(labels, labels_affine, gre.shape, gre_affine, registration, link=link)
            label_images["gre"] = (propagated, gre_affine)
            brain = _template_brain(
                template, template_affine, BRAIN_MARGIN_MM, gre.shape, gre_affine, registration, link
            )
        kept = registration.kept(keep_transforms, "")[1] if keep_transforms is not None else []
        return label_images, registration.similarity, kept, contrast, in_view, brain, local
    finally:
        if not given:
            registration.cleanup()
            if link is not None:
                link.cleanup()


def _label_table(atlas, labels):
    """The atlas's table, with the right halves of split-hemisphere regions (value + 1000) named ``*_right``."""
    table = LabelTable(dict(atlas.table.entries))
    for value in np.unique(labels[labels >= 1000]):
        name, rgb = table.entries.get(int(value) - 1000, (f"label_{int(value) - 1000}", (128, 128, 128)))
        table.entries[int(value)] = (f"{name}_right", rgb)
    return table


def _restrict_cortex(atlas, label_image, region_masks_here, grey, voxel_size, margin_mm, space):
    """Cortex regions kept in grey matter: the written labels keep the region in grey matter whole, the measured
    masks keep its core (`cortex_core`). Returns (labels, measured masks, (region, side, space) → the fraction of
    the region in grey matter)."""
    label_image = label_image.copy()
    measured, shares = dict(region_masks_here), {}
    for (region, side), mask in region_masks_here.items():
        if atlas.region(region).kind != "cortex":
            continue
        label_image[mask & ~grey] = 0
        in_grey = mask & grey
        shares[(region, side, space)] = float(in_grey.sum() / mask.sum()) if mask.any() else 0.0
        core = cortex_core(in_grey, grey, voxel_size, margin_mm)
        measured[(region, side)] = core if core.any() else in_grey
    return label_image, measured, shares


def label_subject(
    reference,
    reference_affine,
    atlas,
    options=None,
    *,
    maps=None,
    gre_magnitude=None,
    tissue_mask=None,
    subject="",
    keep_transforms=None,
    registrations=None,
    workdir=None,
    progress=None,
):
    """Register the subject to the atlas, bring the regions back, and measure the maps in them.

    Parameters
    ----------
    reference : ndarray, 3D
        The subject's reference in DWI space: FA (registered to the atlas's FA template when it has one, else to
        its T1w template) or a T1-like image (`LabelingOptions.reference_contrast` ``"T1w"``).
    reference_affine : ndarray, (4, 4)
    atlas : Atlas
        Resolved atlas (`atlas_for`, `find_atlas`).
    options : LabelingOptions, optional
        Regions, erosion, FA threshold, cortex handling and seed (default `LabelingOptions()`).
    maps : dict name → (ndarray, affine), optional
        Maps to measure, each on the reference's grid or on the GRE's.
    gre_magnitude : (ndarray, affine), optional
        GRE magnitude (first echo if 4D): rigidly linked to the reference, the labels are also brought onto its grid.
    tissue_mask : (ndarray, affine), optional
        Grey-matter mask on either grid: cortex regions (their label voxels and so their statistics) keep only its
        voxels. Without one, and with ``options.cortex_segmentation``, the grey matter of the GRE magnitude is
        segmented (`masks.grey_matter_mask` inside its brain mask): a propagated cortical ribbon misplaced by a
        voxel spills into CSF or white matter, which this removes. With grey matter, cortex regions are measured
        only farther than ``options.cortex_margin_mm`` from the grey matter around them (`cortex_core`).
    keep_transforms : path, optional
        Folder to copy the registration's transform files into (else they are deleted).
    registrations : (Registration, Registration or None), optional
        The reference's registration to the template and the GRE's link, made already (`register_subject`, with
        the same reference, GRE magnitude and options): used as they are, and left in place.
    workdir : path, optional
        Folder for the registration's temporary files (default: the system's temporary folder).

    Returns
    -------
    Labeling
    """
    options = options or LabelingOptions()
    maps = maps or {}
    rois = list(options.rois)
    grids, gre = _check_inputs(reference, reference_affine, atlas, rois, maps, gre_magnitude, tissue_mask)
    gre_affine = grids.get("gre", (None, None))[1]
    raw_labels, labels_affine = atlas.load_labels()
    labels = split_labels_by_hemisphere(raw_labels, labels_affine, atlas)
    template_masks = region_masks(raw_labels, labels_affine, atlas, rois)
    label_images, similarity, kept, contrast, in_view, template_brain, local = _register_and_propagate(
        reference,
        reference_affine,
        atlas,
        labels,
        labels_affine,
        template_masks,
        options,
        gre,
        gre_affine,
        keep_transforms,
        registrations,
        workdir,
        progress,
    )
    grey = _grey_matter(options, atlas, gre, gre_affine, tissue_mask, template_brain)
    kinds = {r: atlas.region(r).kind for r in rois}
    rows, ratios, grey_matter, shares, written = [], {}, {}, {}, {}
    for space, (label_image, affine) in label_images.items():
        shape = grids[space][0]
        region_masks_here = {key: np.isin(label_image, region_values(atlas, *key)) for key in template_masks}
        if space == "reference":
            ratios = volume_ratios(region_masks_here, affine, template_masks, labels_affine, in_view)
        measured = region_masks_here
        here = {
            name: image
            for name, (image, image_affine) in maps.items()
            if geometry.same_grid(image.shape, image_affine, shape, affine)
        }
        if grey is not None and geometry.same_grid(grey[0].shape, grey[1], shape, affine):
            grey_matter[space] = grey
            label_image, measured, share = _restrict_cortex(
                atlas,
                label_image,
                region_masks_here,
                grey[0],
                geometry.voxel_sizes(affine),
                options.cortex_margin_mm,
                space,
            )
            shares.update(share)
        written[space] = (label_image, affine)
        statistics = roi_statistics(
            here,
            measured,
            subject=subject,
            erosion_voxels=options.erosion_voxels,
            fa=here.get("fa"),
            fa_threshold=options.fa_threshold,
            kinds=kinds,
        )
        rows += [{**row, "space": space} for row in statistics]
    outside = {}
    if template_brain is not None:
        on_gre = {n: image for n, (image, a) in maps.items() if geometry.same_grid(image.shape, a, *grids["gre"])}
        outside = outside_brain_shares(on_gre, template_brain)
    flags = quality_flags(similarity, ratios, contrast, shares, outside, local)
    for row in rows:
        row["qc_passed"] = not flags
    report_progress(progress, 1.0, "labelling done", log)
    return Labeling(
        written,
        _label_table(atlas, labels),
        rows,
        ratios,
        flags,
        similarity,
        kept,
        grey_matter,
        contrast,
        in_view,
        shares,
        outside,
        local,
    )
