"""Registration with ANTs (antspyx), the generic part: images in and out of ANTs, one image registered to another, a
rigid transform as a matrix. The atlas labelling (`ALSQuantLib.atlas.registration`) and the head-motion correction
(`ALSQuantLib.motion`) build on it.

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

from . import geometry, outputs

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


@dataclass
class Registration:
    """Subject → template registration: ANTs transform files, and quality figures."""

    forward: list
    """Transform file paths (str, as ANTs takes them)."""
    inverse: list
    similarity: float
    """Correlation of the template with the subject brought onto it; NaN when not measured (`register`)."""
    workdir: Path = None
    """The temporary folder holding the files, removed by `cleanup`; None for files kept elsewhere (`kept`)."""

    def cleanup(self):
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def kept(self, folder, prefix):
        """The transform files copied into `folder`, each name prefixed: (the same `Registration` reading them
        there, which `cleanup` leaves alone; the files written). ANTs names the files of every registration alike
        (``reg_0GenericAffine.mat``, ...), hence the prefix."""
        copies = {}
        for path in dict.fromkeys([*self.forward, *self.inverse]):
            copies[path] = Path(folder) / f"{prefix}{Path(path).name}"
            with outputs.atomic_path(copies[path]) as tmp:
                shutil.copyfile(path, tmp)
        kept = Registration(
            [str(copies[p]) for p in self.forward], [str(copies[p]) for p in self.inverse], self.similarity
        )
        return kept, list(copies.values())

    def as_dict(self):
        """File names (within one folder) and the similarity: what `from_dict` reads back."""
        return {
            "forward": [Path(p).name for p in self.forward],
            "inverse": [Path(p).name for p in self.inverse],
            "similarity": self.similarity,
        }

    @classmethod
    def from_dict(cls, entry, folder):
        """A `Registration` written by `kept` and `as_dict` into `folder`."""
        return cls(
            [str(Path(folder) / n) for n in entry["forward"]],
            [str(Path(folder) / n) for n in entry["inverse"]],
            float(entry["similarity"]),
        )


def register(
    subject,
    subject_affine,
    template,
    template_affine,
    *,
    transform="SyNRA",
    random_seed=0,
    workdir=None,
    similarity=True,
    mask=None,
    **settings,
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
    similarity : bool
        Measure the registered images' correlation (`Registration.similarity`; about 0.3 s on a 128×128×28 grid);
        NaN without.
    mask : ndarray of bool, optional
        On the template's grid: the metric samples only these voxels.

    Returns
    -------
    Registration
    """
    antspyx = load_ants()
    if os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS") != "1":
        log.warning("ANTs runs multi-threaded: registrations will differ slightly from run to run")
    fixed = to_ants(template / max(np.percentile(template, 99), 1e-6), template_affine)
    moving = to_ants(subject / max(np.percentile(subject, 99), 1e-6), subject_affine)
    if mask is not None:
        settings["mask"] = to_ants(np.asarray(mask, dtype=np.float32), template_affine)
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
    correlation = np.nan
    if similarity:
        correlation = -float(antspyx.image_similarity(fixed, result["warpedmovout"], metric_type="Correlation"))
    return Registration(result["fwdtransforms"], result["invtransforms"], correlation, workdir)


def rigid_pose(registration):
    """A rigid or affine `Registration`'s transform as a RAS 4×4 matrix taking a point of the template (fixed) image
    to the matching point of the subject (moving) image, mm.

    ANTs stores ``p_moving = A (p − c) + c + t`` in LPS physical space; LPS and RAS differ by the sign of x and y.
    """
    transform = load_ants().read_transform(registration.forward[0])
    parameters = np.asarray(transform.parameters, dtype=float)
    centre = np.asarray(transform.fixed_parameters, dtype=float)[:3]
    matrix, shift = parameters[:9].reshape(3, 3), parameters[9:12]
    flip = np.diag([-1.0, -1.0, 1.0])
    pose = np.eye(4)
    pose[:3, :3] = flip @ matrix @ flip
    pose[:3, 3] = flip @ (centre - matrix @ centre + shift)
    return pose
