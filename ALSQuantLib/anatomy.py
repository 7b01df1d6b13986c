"""Simulated subjects made from real anatomy, for accuracy figures the analytic phantom cannot give.

The template anatomy comes from real images instead of ellipsoids:

* tissue from the MNI152 2009a symmetric template and its grey- and white-matter probability maps, which nilearn
  ships inside its wheel (no download; ``pip install "alsquant[anatomy]"``);
* the CST from JHU's tractography atlas (its whole course), M1 from Harvard-Oxford's precentral gyrus in grey
  matter, both from the user's FSL installation or atlas folder (`ALSQuantLib.atlas.find_atlas`);
* fibre directions along the CST from the tract's own local orientation (the principal axis of its voxels within
  a few millimetres), left-right elsewhere as in the phantom;
* deep grey matter, when JHU Eve's folder is given: its globus pallidus (the phantom's deep grey matter has a
  pallidum's susceptibility, 0.15 ppm), carried like the other atlases' labels.

It gives labels in the phantom's codes (`ALSQuantLib.phantom`), so the phantom's pose and warp, its DKI and GRE
signal models and its truth files apply unchanged (`phantom.simulate_subject(..., anatomy=RealAnatomy(...))`).
The atlases live in FSL's MNI152 (NLin6) space and the tissue in MNI152 2009a: the two differ by millimetres, so
the atlases' labels (and FA) are carried onto the 2009a anatomy by a T1-to-T1 registration of the two templates
(`_from_atlas_space`); the anatomy, its true labels and its FA then agree, as a real brain's do.

Outside the brain, a head (`RealAnatomy.outside_brain`): the skull, the scalp and the air around them, as shells
at fixed distances from the brain (`HEAD_LAYERS_MM`), soft tissue instead of air below the skull base, and the
phantom's air cavities (a frontal sinus and ear canals placed in MNI-like coordinates). What stays simplified: the
head's shape follows the brain's, tissue values per class as in the phantom (white-matter FA from a real FA map by
default).
"""

import atexit
import functools
from importlib import resources

import numpy as np
from scipy import ndimage

from . import geometry, io, phantom
from .atlas import find_atlas
from .atlas.registration import warp_to_subject
from .errors import InputError
from .registration import register

_NILEARN_FILES = {name: f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz" for name in ("t1", "gm", "wm")}
_TRACT_SIGMA_MM = 4.0
_ATLASES = ("jhu-tracts", "harvard-oxford")
_DEEP_GREY_MATTER = {phantom.DEEP_GM_LEFT: "GLOBUS_PALLIDUS_left", phantom.DEEP_GM_RIGHT: "GLOBUS_PALLIDUS_right"}
"""The phantom's deep grey matter codes → the Eve label names they are made from."""


def _nilearn_image(name):
    try:
        folder = resources.files("nilearn.datasets") / "data"
    except ModuleNotFoundError:
        raise InputError(
            'real anatomy needs nilearn\'s MNI152 template: pip install "alsquant[anatomy]" (or nilearn)'
        ) from None
    return io.load_image(folder / _NILEARN_FILES[name], ndim=3, what=f"nilearn MNI152 {name}")


def tract_directions(mask, voxel_size, sigma_mm=_TRACT_SIGMA_MM):
    """Unit direction of a tube-like mask at each of its voxels: the principal axis of the mask's voxels around it
    (local second moments under a Gaussian of `sigma_mm`), in voxel axes scaled to mm.

    >>> tube = np.zeros((9, 9, 30), bool); tube[3:6, 3:6, :] = True
    >>> np.round(np.abs(tract_directions(tube, (1, 1, 1))[4, 4, 15]), 3).tolist()
    [0.0, 0.0, 1.0]
    """
    mask = np.asarray(mask, bool)
    directions = np.zeros(mask.shape + (3,))
    if not mask.any():
        return directions
    sigma = sigma_mm / np.asarray(voxel_size, float)
    margin = np.ceil(4 * sigma).astype(int)  # the tract's bounding box and the filters' reach: the rest is zero
    found = np.argwhere(mask)
    box = tuple(
        slice(max(lo - m, 0), min(hi + m + 1, n))
        for lo, hi, m, n in zip(found.min(0), found.max(0), margin, mask.shape)
    )
    directions[box] = _directions_in(mask[box], voxel_size, sigma)
    return directions


def _directions_in(mask, voxel_size, sigma):
    coords = np.indices(mask.shape).astype(np.float64) * np.asarray(voxel_size, float)[:, None, None, None]
    weight = ndimage.gaussian_filter(mask.astype(np.float64), sigma)
    safe = np.where(weight > 1e-6, weight, 1.0)
    means = [ndimage.gaussian_filter(mask * c, sigma) / safe for c in coords]
    moments = np.empty(mask.shape + (3, 3))
    for i in range(3):
        for j in range(i, 3):
            second = ndimage.gaussian_filter(mask * coords[i] * coords[j], sigma) / safe
            moments[..., i, j] = moments[..., j, i] = second - means[i] * means[j]
    directions = np.zeros(mask.shape + (3,))
    _, vectors = np.linalg.eigh(moments[mask])
    directions[mask] = vectors[:, :, -1]
    return directions


ATLAS_FA = "atlas"
"""`RealAnatomy`'s default white-matter FA: the atlas's FA template (FSL's FMRIB58), when it has one."""

_REGISTRATION_MM = 2.0

HEAD_LAYERS_MM = {"bone": (1.0, 7.0), "scalp": (7.0, 12.0)}
"""The skull and the scalp as distances from the brain's surface (mm); air beyond, soft tissue (the neck, the face)
instead of air below `SKULL_BASE_MNI_Z`."""
SKULL_BASE_MNI_Z = -40.0


@functools.lru_cache(maxsize=2)
def _from_atlas_space(template_path, seed=0):
    """The registration of this anatomy's T1 (MNI152 2009a) to the atlas's T1 template (FSL's MNI152, NLin6).

    The two MNI templates differ by millimetres, locally by as much as a subject registration's error: labels and FA
    from the atlas space must come through this registration (same contrast, two averages of hundreds of brains:
    the best correspondence there is), or the subject's tissue and its "true" labels disagree and no registration
    to the atlas's template can find them (measured: CST Dice 0.38 with no deformation at all). Registered at
    2 mm; the transforms act in physical space. Made once per template in a process.
    """
    t1, affine = _nilearn_image("t1")
    template, template_affine = io.load_image(template_path, ndim=3, what="the atlases' T1w template")
    registration = register(
        *geometry.coarsened(t1, affine, _REGISTRATION_MM),
        *geometry.coarsened(template, template_affine, _REGISTRATION_MM),
        random_seed=seed,
    )
    atexit.register(registration.cleanup)  # kept for the process: every RealAnatomy on these atlases uses it
    return registration


class RealAnatomy:
    """The phantom's template anatomy (`phantom.template_anatomy`'s interface) from real images.

    Parameters
    ----------
    fsldir, atlas_dir : path, optional
        Where JHU's tractography atlas and Harvard-Oxford's cortical atlas are (an FSL installation, or a folder with
        their files), as for `ALSQuantLib.atlas.find_atlas`.
    fa_template : path or "atlas" or None
        A real FA map in the atlases' space (FSL's MNI152): white-matter FA then follows it voxel by voxel; "atlas"
        (default): the atlas's FA template (FSL's FMRIB58) if it has one; None: one value per class. A subject whose
        FA follows the very template its labelling registers to is an optimistic case, one value per class (no
        contrast inside the white matter) a pessimistic one.
    eve_dir : path, optional
        JHU Eve's folder (`ALSQuantLib.atlas.find_atlas`): its globus pallidus becomes the deep grey matter; without
        it the anatomy has none.

    The atlases' labels and FA are brought onto the MNI152 2009a anatomy through `_from_atlas_space`. Template
    coordinates are MNI's, shifted so that the brain's centre is at the origin (where the phantom's subject grids
    are centred).
    """

    def __init__(self, *, fsldir=None, atlas_dir=None, fa_template=ATLAS_FA, eve_dir=None):
        t1, affine = _nilearn_image("t1")
        gm, wm = _nilearn_image("gm")[0] / 255.0, _nilearn_image("wm")[0] / 255.0
        brain = ndimage.binary_fill_holes(t1 > 0)
        labels = np.zeros(t1.shape, np.uint8)
        labels[brain] = phantom.CSF
        labels[brain & (gm >= 0.5) & (gm >= wm)] = phantom.GM
        labels[brain & (wm > 0.5) & (wm > gm)] = phantom.WM
        world = geometry.voxel_centers_world(t1.shape, affine)
        tract_atlas, cortex_atlas = (find_atlas(n, fsldir=fsldir, atlas_dir=atlas_dir) for n in _ATLASES)
        if tract_atlas.space != cortex_atlas.space:
            raise InputError(
                f"atlases {_ATLASES}: in different template spaces ({tract_atlas.space}, {cortex_atlas.space})"
            )
        if fa_template == ATLAS_FA:
            fa_template = tract_atlas.template_fa
        registration = _from_atlas_space(str(tract_atlas.template))

        def carried(image, image_affine, labels):
            return warp_to_subject(image, image_affine, t1.shape, affine, registration, labels=labels)

        tracts, cortex = (np.rint(carried(*a.load_labels(), True)) for a in (tract_atlas, cortex_atlas))
        self.fa = None
        if fa_template is not None:
            self.fa = carried(*io.load_image(fa_template, ndim=3, what="FA template"), False)
        fibre = np.zeros(t1.shape + (3,))
        fibre[..., 0] = 1.0
        for code, side in ((phantom.CST_LEFT, "left"), (phantom.CST_RIGHT, "right")):
            cst = np.isin(tracts, tract_atlas.region("CST").labels[side]) & (labels != phantom.CSF) & brain
            labels[cst] = code
            directions = tract_directions(cst, geometry.voxel_sizes(affine))
            fibre[cst] = directions[cst] @ geometry.direction_cosines(affine).T
        precentral = np.isin(cortex, cortex_atlas.region("M1").labels["both"]) & (labels == phantom.GM)
        labels[precentral & (world[..., 0] < 0)] = phantom.M1_LEFT
        labels[precentral & (world[..., 0] > 0)] = phantom.M1_RIGHT
        self.labels, self.fibre, self.affine = labels, fibre, affine
        self.description = (
            f"MNI152 2009a (nilearn) tissue, CST from {tract_atlas.labels}, M1 from {cortex_atlas.labels}, both "
            f"through a registration of {tract_atlas.template} to the 2009a T1"
        )
        if eve_dir is not None:
            eve = find_atlas("eve", atlas_dir=eve_dir)
            eve_labels = warp_to_subject(
                *eve.load_labels(), t1.shape, affine, _from_atlas_space(str(eve.template)), labels=True
            )
            for code, name in _DEEP_GREY_MATTER.items():
                pallidus = np.isin(np.rint(eve_labels), eve.table.values(name))
                labels[pallidus & np.isin(labels, (phantom.GM, phantom.WM))] = code  # the CST keeps its voxels
            self.description += f"; deep grey matter from Eve's globus pallidus ({eve.labels}), likewise"
        self.description += f", white-matter FA from {fa_template}" if self.fa is not None else ", FA per class"
        self.centre_mm = world[brain].mean(axis=0)
        self._to_voxel = np.linalg.inv(affine)
        self.head = _head(brain, affine, world[..., 2])

    def _voxels(self, points):
        mni = np.asarray(points, float).reshape(-1, 3) + self.centre_mm
        ijk = np.rint(mni @ self._to_voxel[:3, :3].T + self._to_voxel[:3, 3]).astype(int)
        inside = np.all((ijk >= 0) & (ijk < np.array(self.labels.shape)), axis=1)
        return np.clip(ijk, 0, np.array(self.labels.shape) - 1), inside

    def template_anatomy(self, points):
        """Labels (phantom codes) and unit fibre directions at template points (mm, brain centre at 0)."""
        ijk, inside = self._voxels(points)
        labels = np.where(inside, self.labels[tuple(ijk.T)], phantom.BACKGROUND).astype(np.uint8)
        fibre = self.fibre[tuple(ijk.T)]
        return labels, fibre

    def fa_at(self, points):
        """FA at template points from the FA template (None without one)."""
        if self.fa is None:
            return None
        ijk, inside = self._voxels(points)
        return np.where(inside, self.fa[tuple(ijk.T)], 0.0)

    def outside_brain(self, points):
        """What lies outside the brain at template points (`phantom.AIR`, `phantom.BONE`, ...): the head around the
        brain (`_head`) and the phantom's sinus and ear canals, in MNI coordinates."""
        mni = np.asarray(points, float).reshape(-1, 3) + self.centre_mm
        ijk, inside = self._voxels(points)
        beyond = np.where(mni[:, 2] < SKULL_BASE_MNI_Z, phantom.SCALP, phantom.AIR)
        head = np.where(inside, self.head[tuple(ijk.T)], beyond)
        return np.where(phantom.air_cavities(mni), phantom.AIR, head).astype(np.uint8)


def _head(brain, affine, z_mni):
    """Codes of what lies outside `brain` on its grid (`HEAD_LAYERS_MM`, `SKULL_BASE_MNI_Z`), `z_mni` each voxel's
    MNI z; `phantom.NO_HEAD` inside the brain and in the first millimetre around it."""
    distance = ndimage.distance_transform_edt(~brain, sampling=geometry.voxel_sizes(affine))
    head = np.where(z_mni < SKULL_BASE_MNI_Z, phantom.SCALP, phantom.AIR).astype(np.uint8)
    for name, code in (("scalp", phantom.SCALP), ("bone", phantom.BONE)):
        head[distance <= HEAD_LAYERS_MM[name][1]] = code
    head[distance <= HEAD_LAYERS_MM["bone"][0]] = phantom.NO_HEAD
    return head


def anatomy_config(base=None):
    """`phantom.PhantomConfig` with fields of view that hold a real brain (the phantom's small grids are 126 mm
    high; a brain is about 150 mm): DWI 72×84×72 at 2.5 mm, GRE 88×104×88 at 2 mm, unless `base` sets the study's."""
    base = base or phantom.PhantomConfig()
    if base.dwi_shape != phantom.PhantomConfig().dwi_shape:
        return base
    return phantom.with_overrides(
        base,
        dwi_shape=(72, 84, 72),
        dwi_voxel_size=(2.5, 2.5, 2.5),
        gre_shape=(88, 104, 88),
        gre_voxel_size=(2.0, 2.0, 2.0),
    )


@functools.lru_cache(maxsize=2)
def real_anatomy(fsldir=None, atlas_dir=None, fa_template=ATLAS_FA, eve_dir=None):
    """`RealAnatomy`, built once per atlas location (and FA template, and Eve folder) in a process."""
    return RealAnatomy(fsldir=fsldir, atlas_dir=atlas_dir, fa_template=fa_template, eve_dir=eve_dir)
