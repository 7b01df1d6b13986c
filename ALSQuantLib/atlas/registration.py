"""Registration with ANTs (antspyx): the subject to the template, and the atlas labels back through the inverse.

ANTs repeats exactly only single-threaded and with a non-zero seed, and ITK reads its thread count once, at its
first use: so `load_ants` sets it (one thread unless ``ALSQUANT_ANTS_THREADS`` says otherwise) before antspyx is first
imported. ALSQUANT_ANTS_THREADS=2 buys speed (measured 1.6x on the phantom) at the price of run-to-run differences.
"""

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import geometry

log = logging.getLogger(__name__)


def load_ants():
    """antspyx, imported with ITK's thread count fixed first (see the module's notes)."""
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", os.environ.get("ALSQUANT_ANTS_THREADS", "1"))
    import ants.config  # the registration seed lives there

    return ants


WORKDIR_PREFIX = "alsquant-ants-"


def to_ants(data, affine):
    origin, spacing, direction = geometry.itk_from_affine(affine)
    return load_ants().from_numpy(
        np.ascontiguousarray(data, dtype=np.float32), origin=origin, spacing=spacing, direction=direction
    )


def from_ants(image):
    return image.numpy(), geometry.affine_from_itk(image.origin, image.spacing, image.direction)


def bias_corrected(image, affine, mask, *, fit_mm=2.0):
    """`image` with its smooth intensity bias (a receive coil's profile) removed by N4 (Tustison 2010, antspyx's
    ``n4_bias_field_correction``): the field is fitted inside `mask` on the image resampled to `fit_mm` voxels and
    shrunk 4× more by N4 (a smooth field needs no finer grid: 3-7 s on the study's 0.5 mm GRE, 30 s at its own
    grid) and divided out on the image's own grid."""
    ants = load_ants()
    coarse, coarse_affine = geometry.coarsened(image, affine, fit_mm)
    coarse_mask, _ = geometry.coarsened(mask.astype(np.float32), affine, fit_mm)
    field = ants.n4_bias_field_correction(
        to_ants(coarse, coarse_affine),
        mask=to_ants((coarse_mask > 0.5).astype(np.float32), coarse_affine),
        shrink_factor=4,
        return_bias_field=True,
    ).numpy()
    field = geometry.resample(np.log(np.maximum(field, 1e-6)), coarse_affine, np.shape(image), affine, order=1)
    return np.asarray(image, np.float32) / np.exp(field).astype(np.float32)


@dataclass
class Registration:
    """Subject → template registration: ANTs transform files, and quality figures."""

    forward: list
    inverse: list
    similarity: float
    workdir: Path

    def cleanup(self):
        shutil.rmtree(self.workdir, ignore_errors=True)


def register(
    subject, subject_affine, template, template_affine, *, transform="SyNRA", random_seed=0, workdir=None, **settings
):
    """Register the subject image to the template (rigid → affine → SyN by default) with antspyx.

    Parameters
    ----------
    subject, template : ndarray, 3D
        Images of similar contrast (e.g. subject FA and template FA; GRE magnitude and template T1w works through
        the mutual-information metric).
    transform : str
        ANTsPy ``type_of_transform`` (``"SyNRA"``: rigid + affine + SyN; ``"Rigid"``; ``"Affine"``).
    random_seed : int
        Seeds the metric sampling; with ANTs single-threaded (this module's default) results repeat bit for bit.
    workdir : path, optional
        Where the transform files go, in a new ``alsquant-ants-*`` folder (default: the system's temporary folder);
        removed if the registration fails, else by `Registration.cleanup`.

    Returns
    -------
    Registration
    """
    antspyx = load_ants()
    if os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS") != "1":
        log.warning("ANTs runs multi-threaded: registrations will differ slightly from run to run")
    fixed = to_ants(template / max(np.percentile(template, 99), 1e-6), template_affine)
    moving = to_ants(subject / max(np.percentile(subject, 99), 1e-6), subject_affine)
    workdir = Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX, dir=workdir))
    # antsRegistration reads seed 0 as "seed from the clock": shift by one. antspyx takes the seed from its config.
    previous = antspyx.config._random_seed
    antspyx.config._random_seed = int(random_seed) + 1
    try:
        result = antspyx.registration(
            fixed=fixed, moving=moving, type_of_transform=transform, outprefix=str(workdir / "reg_"), **settings
        )
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    finally:
        antspyx.config._random_seed = previous
    similarity = float(antspyx.image_similarity(fixed, result["warpedmovout"], metric_type="Correlation"))
    return Registration(result["fwdtransforms"], result["invtransforms"], -similarity, workdir)


def _inverse_chain(registration):
    """The registration's inverse transforms and which of them ANTs must invert (the affine ones)."""
    return list(registration.inverse), [not str(t).endswith(".nii.gz") for t in registration.inverse]


def warp_to_subject(image, template_affine, subject_shape, subject_affine, registration, *, link=None, labels=False):
    """An image in template space brought onto the subject's grid through the inverse transform (linear
    interpolation; generic-label interpolation with `labels`).

    Parameters
    ----------
    registration : Registration
        Subject reference → template.
    link : Registration, optional
        Another image of the same subject (e.g. GRE magnitude) → the reference, rigid: the image then lands on that
        image's grid (`subject_shape`, `subject_affine`), one atlas registration serving both.
    """
    transforms, invert = _inverse_chain(registration)
    if link is not None:
        # ANTs applies the last transform first to a point of the output grid: image → reference → template.
        link_transforms, link_invert = _inverse_chain(link)
        transforms, invert = transforms + link_transforms, invert + link_invert
    moved = load_ants().apply_transforms(
        fixed=to_ants(np.zeros(subject_shape, np.float32), subject_affine),
        moving=to_ants(image, template_affine),
        transformlist=transforms,
        whichtoinvert=invert,
        interpolator="genericLabel" if labels else "linear",
    )
    return moved.numpy()


def template_points_to_subject(points, registration):
    """Points in template space (RAS mm, shape (n, 3)) carried into the subject's reference space. ANTs maps points
    the opposite way to images: the forward transforms, which bring the subject's image onto the template, carry
    template points onto the subject."""
    import pandas as pd  # antspyx's own dependency, for its point sets

    lps = np.asarray(points, float) * [-1.0, -1.0, 1.0]  # ITK's physical space is LPS
    moved = load_ants().apply_transforms_to_points(
        3,
        pd.DataFrame(lps, columns=["x", "y", "z"]),
        list(registration.forward),
        whichtoinvert=[False] * len(registration.forward),
    )
    return moved[["x", "y", "z"]].to_numpy() * [-1.0, -1.0, 1.0]


def propagate_labels(labels, template_affine, subject_shape, subject_affine, registration, *, link=None):
    """Atlas labels in the subject's space through the inverse transform (`warp_to_subject`, generic-label
    interpolation)."""
    moved = warp_to_subject(
        labels, template_affine, subject_shape, subject_affine, registration, link=link, labels=True
    )
    return np.rint(moved).astype(np.int32)
