"""The atlas's side of registration: the subject registered to the template (`register`, from
`ALSQuantLib.registration`), bias-field correction, and the atlas labels and points carried back through the
inverse."""

import numpy as np

from .. import geometry
from ..registration import load_ants, to_ants


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
