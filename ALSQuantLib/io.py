"""Reading and writing the images ALSQuant works on.

* DWI as NIfTI + FSL ``.bval``/``.bvec``, or as NRRD with the ``DWMRI_*`` keys and a measurement frame.
* GRE magnitude and phase, one 4D file or one file per echo, with echo times (s) and field strength (T) from the
  BIDS JSON sidecars when present.
* Scalar maps and label maps as NIfTI; JSON and tables.

Arrays are nibabel-ordered ``(i, j, k[, n])`` with a RAS affine; gradients are RAS unit vectors (see
`ALSQuantLib.geometry`). Every write is atomic: a temporary file in the destination folder, then a rename, so a
killed process never leaves a half-written output.
"""

import csv
import gzip
import json
import math
from dataclasses import dataclass, field
from io import StringIO
from pathlib import Path

import numpy as np

from . import geometry
from .errors import InputError
from .outputs import atomic_path

NIFTI_SUFFIXES = (".nii.gz", ".nii")
NRRD_SUFFIXES = (".nrrd", ".nhdr")
MIN_DIFFUSION_WEIGHTING = 50.0
"""s/mm²: b-values at or below it count as b = 0 by default (``DKIOptions.b0_threshold``); a DWI whose largest
b-value is below it is in other units."""


# --------------------------------------------------------------------------------------------------------------
# Text and JSON
# --------------------------------------------------------------------------------------------------------------
def write_text(path, text):
    """Write `text` to `path` atomically; a file that already holds exactly `text` is left alone (a rerun whose
    results did not change writes nothing, so it also works on a full disk)."""
    path, data = Path(path), text.encode("utf-8")
    try:
        if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
            return
    except OSError:
        pass  # unreadable: replace it
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def json_ready(value):
    """`value` with NumPy types as Python's, paths as strings and NaN or infinite numbers as null: standard JSON has
    no NaN or Infinity, and other readers refuse them."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path, obj):
    """Write `obj` as indented, standard JSON, atomically: NumPy values are converted, NaN and infinities become
    null."""
    write_text(path, json.dumps(json_ready(obj), indent=2, allow_nan=False) + "\n")


def read_json(path):
    """Read a JSON file, with an error naming the file when it is missing or malformed."""
    path = _existing(path, "JSON file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not valid JSON ({err})") from None


# --------------------------------------------------------------------------------------------------------------
# Plain images
# --------------------------------------------------------------------------------------------------------------
def _existing(path, what):
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {path}: file not found")
    return path


def strip_image_suffix(path):
    """``sub-01_dwi.nii.gz`` → ``sub-01_dwi`` (as a Path in the same folder)."""
    path = Path(path)
    for suffix in NIFTI_SUFFIXES + NRRD_SUFFIXES:
        if path.name.endswith(suffix):
            return path.with_name(path.name[: -len(suffix)])
    return path


def load_image(path, *, ndim=None, what="image", allow_nonfinite=False):
    """Read a NIfTI or NRRD image as ``(data, affine)`` in nibabel order with a RAS affine.

    Parameters
    ----------
    path : str or Path
    ndim : int or tuple of int, optional
        Accepted dimensionalities; a 3D file where 4D is needed is refused with a message naming the file.
    what : str
        What the image is, for messages ("DWI", "phase", ...).
    allow_nonfinite : bool
        By default NaN or infinite voxels are refused.

    Returns
    -------
    data : ndarray, float32 (float64 inputs stay float64)
    affine : ndarray, shape (4, 4)
    """
    path = _existing(path, what)
    if path.name.endswith(NRRD_SUFFIXES):
        data, affine, _ = _read_nrrd(path, what)
    else:
        import nibabel as nib

        try:
            img = nib.load(str(path))
        except Exception as err:  # nibabel raises several types for unreadable files
            raise InputError(f"{what} {path}: not a readable NIfTI image ({err})") from None
        try:  # nibabel reads the voxels only now: a truncated or corrupted file fails here
            data = np.asanyarray(img.dataobj)
            if path.name.endswith(".gz"):
                _check_gzip(path)
        except Exception as err:  # EOFError, zlib.error, OSError ("CRC check failed"), ValueError (short file)
            raise InputError(
                f"{what} {path}: the file is truncated or damaged ({type(err).__name__}: {err}); "
                "expected a complete NIfTI image"
            ) from None
        if data.dtype != np.float64:
            data = data.astype(np.float32)
        affine = img.affine
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if data.ndim not in allowed:
            wanted = " or ".join(f"{n}D" for n in allowed)
            raise InputError(f"{what} {path}: expected a {wanted} image, got {data.ndim}D with shape {data.shape}")
    if not allow_nonfinite:
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            raise InputError(f"{what} {path}: {bad} voxel values are NaN or infinite; expected finite values")
    return data, np.asarray(affine, dtype=float)


def _check_gzip(path):
    """Read a gzip file to its end, where its CRC is checked: nibabel stops after the voxels, so a damaged stream
    that still inflates would pass unnoticed."""
    with gzip.open(path, "rb") as stream:
        while stream.read(1 << 24):
            pass


def image_grid(path, what="image"):
    """``(shape, affine)`` of an image from its header alone (NIfTI; NRRD is read whole), to check grids before any
    computation."""
    path = _existing(path, what)
    if path.name.endswith(NRRD_SUFFIXES):
        data, affine = load_image(path, what=what, allow_nonfinite=True)
        return data.shape, affine
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception as err:  # nibabel raises several types for unreadable files
        raise InputError(f"{what} {path}: not a readable NIfTI image ({err})") from None
    return tuple(int(n) for n in img.shape), np.asarray(img.affine, dtype=float)


def load_mask(path, shape, affine, *, matching="image"):
    """Read a mask (non-zero = inside) and check it lies on the grid of `shape` and `affine`."""
    data, mask_affine = load_image(path, ndim=3, what="mask")
    geometry.require_grid(f"mask {path}", (data.shape, mask_affine), {matching: (shape, affine)})
    inside = data > 0
    if not inside.any():
        raise InputError(f"mask {path}: it is empty (no non-zero voxel); expected a brain mask")
    return inside


def save_image(path, data, affine, *, dtype=np.float32, description=None):
    """Write `data` as NIfTI (``.nii`` or ``.nii.gz``) atomically, with `affine` as both qform and sform."""
    import nibabel as nib

    data = np.asarray(data)
    if data.ndim not in (3, 4):
        raise InputError(f"{path}: expected a 3D or 4D array to save, got {data.ndim}D")
    img = nib.Nifti1Image(data.astype(dtype, copy=False), np.asarray(affine, dtype=float))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    if description:
        img.header["descrip"] = description[:79].encode()
    with atomic_path(path) as tmp:
        img.to_filename(str(tmp))


# --------------------------------------------------------------------------------------------------------------
# DWI
# --------------------------------------------------------------------------------------------------------------
@dataclass
class DWI:
    """A diffusion-weighted series.

    Attributes
    ----------
    data : ndarray, shape (i, j, k, n), float32
    affine : ndarray, shape (4, 4), voxel → RAS
    bvals : ndarray, shape (n,), s/mm²
    bvecs : ndarray, shape (n, 3), RAS unit vectors (zero rows for b = 0)
    source : str
        Where it was read from, for messages and provenance.
    """

    data: np.ndarray
    affine: np.ndarray
    bvals: np.ndarray
    bvecs: np.ndarray
    source: str = ""

    def __post_init__(self):
        self.data = np.asarray(self.data)
        self.affine = np.asarray(self.affine, dtype=float)
        self.bvals = np.asarray(self.bvals, dtype=float).ravel()
        self.bvecs = np.asarray(self.bvecs, dtype=float).reshape(-1, 3)
        name = self.source or "DWI"
        if self.data.ndim != 4:
            raise InputError(f"{name}: DWI data must be 4D (i, j, k, volumes), got {self.data.ndim}D {self.data.shape}")
        n = self.data.shape[3]
        if len(self.bvals) != n or len(self.bvecs) != n:
            raise InputError(
                f"{name}: {n} volumes but {len(self.bvals)} b-values and {len(self.bvecs)} gradient directions; "
                "expected one of each per volume"
            )
        if not np.all(np.isfinite(self.bvals)) or np.any(self.bvals < 0):
            raise InputError(f"{name}: b-values must be finite and non-negative, got {self.bvals}")
        if 0 < self.bvals.max() < MIN_DIFFUSION_WEIGHTING:
            raise InputError(
                f"{name}: the largest b-value is {self.bvals.max():g}: the b-values look like ms/µm² (or are all "
                f"b = 0); expected s/mm² (e.g. 1000 and 2500): multiply them by 1000"
            )
        if not np.all(np.isfinite(self.bvecs)):
            raise InputError(f"{name}: gradient directions contain NaN or infinite values")

    @property
    def bvecs_voxel(self):
        """Gradient directions in the frame of the image axes, the frame in which fitted tensors are expressed."""
        return geometry.world_to_voxel_directions(self.bvecs, self.affine)


def _read_table(path, what):
    path = _existing(path, what)
    try:
        return np.loadtxt(path, ndmin=2)
    except ValueError as err:
        raise InputError(f"{what} {path}: expected whitespace-separated numbers ({err})") from None


def read_fsl_gradients(bval_path, bvec_path, affine):
    """Read FSL ``.bval``/``.bvec`` files; return ``(bvals, bvecs_ras)``."""
    bvals = _read_table(bval_path, "b-value file").ravel()
    bvecs = _read_table(bvec_path, "b-vector file")
    if bvecs.shape[0] != 3 and bvecs.shape[1] == 3:
        bvecs = bvecs.T  # tolerate one vector per row
    if bvecs.shape[0] != 3:
        raise InputError(f"b-vector file {bvec_path}: expected 3 rows (x, y, z), got shape {bvecs.shape}")
    if bvecs.shape[1] != bvals.size:
        raise InputError(
            f"b-vector file {bvec_path} has {bvecs.shape[1]} directions but b-value file {bval_path} "
            f"has {bvals.size} values; expected one direction per b-value"
        )
    bvecs = bvecs.T
    norms = np.linalg.norm(bvecs, axis=1)
    # Scanners store some b = 0 volumes as b = 5 or 10 with no direction: only above the b = 0 range is one needed.
    weighted = bvals > MIN_DIFFUSION_WEIGHTING
    if np.any(weighted & (norms < 1e-6)):
        raise InputError(
            f"b-vector file {bvec_path}: a diffusion-weighted volume (b > {MIN_DIFFUSION_WEIGHTING:g} s/mm²) has a "
            "zero gradient direction"
        )
    unit = np.divide(bvecs, norms[:, None], out=np.zeros_like(bvecs), where=norms[:, None] > 1e-6)
    return bvals, geometry.fsl_bvecs_to_ras(unit, affine)


def read_dwi(path, bval=None, bvec=None):
    """Read a DWI series from NIfTI + FSL files or from NRRD.

    Parameters
    ----------
    path : str or Path
        ``.nii``/``.nii.gz`` (with FSL gradient files) or ``.nrrd``/``.nhdr`` (gradients in the header).
    bval, bvec : str or Path, optional
        FSL files; default: beside the image with the same stem (``sub-01_dwi.bval``).

    Returns
    -------
    DWI
    """
    path = Path(path)
    if path.name.endswith(NRRD_SUFFIXES):
        data, affine, header = _read_nrrd(_existing(path, "DWI"), "DWI")
        bvals, bvecs = _nrrd_gradients(header, path)
        _check_dwi_data(data, path)
        return DWI(data, affine, bvals, bvecs, source=str(path))
    stem = strip_image_suffix(path)
    bval = Path(bval) if bval else stem.with_suffix(".bval")
    bvec = Path(bvec) if bvec else stem.with_suffix(".bvec")
    data, affine = load_image(path, ndim=4, what="DWI", allow_nonfinite=True)
    _check_dwi_data(data, path)
    bvals, bvecs = read_fsl_gradients(bval, bvec, affine)
    if bvals.size != data.shape[3]:
        raise InputError(
            f"DWI {path} has {data.shape[3]} volumes but {bval} lists {bvals.size} b-values; expected one per volume"
        )
    return DWI(data, affine, bvals, bvecs, source=str(path))


def _check_dwi_data(data, path):
    """A 4D image. Non-finite signals are allowed: the fit masks and counts them (`ALSQuantLib.dki`)."""
    if data.ndim != 4:
        raise InputError(f"DWI {path}: expected a 4D image (volumes along the 4th axis), got shape {data.shape}")


def write_dwi(dwi, path):
    """Write a `DWI` as NIfTI + FSL ``.bval``/``.bvec`` beside it, or as NRRD, chosen by the suffix of `path`."""
    path = Path(path)
    if path.name.endswith(NRRD_SUFFIXES):
        _write_nrrd_dwi(dwi, path)
        return
    save_image(path, dwi.data, dwi.affine)
    stem = strip_image_suffix(path)
    write_text(stem.with_suffix(".bval"), " ".join(f"{b:g}" for b in dwi.bvals) + "\n")
    fsl = geometry.ras_to_fsl_bvecs(dwi.bvecs, dwi.affine)
    write_text(stem.with_suffix(".bvec"), "\n".join(" ".join(f"{v:.8f}" for v in row) for row in fsl.T) + "\n")


def _read_nrrd(path, what):
    import nrrd

    try:
        data, header = nrrd.read(str(path))
    except Exception as err:  # pynrrd raises NRRDError and others for malformed files
        raise InputError(f"{what} {path}: not a readable NRRD file ({err})") from None
    directions = np.asarray(header.get("space directions"), dtype=float)
    if "space" not in header or directions.ndim != 2:
        raise InputError(f"{what} {path}: NRRD header needs 'space' and 'space directions'")
    spatial = [i for i, row in enumerate(directions) if np.all(np.isfinite(row))]
    if len(spatial) != 3:
        raise InputError(f"{what} {path}: expected 3 spatial axes in 'space directions', found {len(spatial)}")
    others = [i for i in range(data.ndim) if i not in spatial]
    data = np.moveaxis(data, spatial + others, list(range(data.ndim)))
    if data.dtype != np.float64:
        data = data.astype(np.float32)
    affine = geometry.affine_from_nrrd(directions[spatial], header.get("space origin"), header["space"])
    return data, affine, header


def _nrrd_gradients(header, path):
    try:
        bmax = float(header["DWMRI_b-value"])
    except (KeyError, ValueError):
        raise InputError(f"DWI {path}: NRRD header has no numeric DWMRI_b-value") from None
    keys = sorted(k for k in header if k.startswith("DWMRI_gradient_"))
    if not keys:
        raise InputError(f"DWI {path}: NRRD header has no DWMRI_gradient_NNNN keys")
    try:
        raw = np.array([[float(v) for v in str(header[k]).split()] for k in keys])
    except ValueError:
        raise InputError(f"DWI {path}: a DWMRI_gradient value is not three numbers") from None
    if raw.shape[1] != 3:
        raise InputError(f"DWI {path}: each DWMRI_gradient must have 3 components")
    # teem (and Slicer) make each vector of the header's "measurement frame" a column of the matrix; pynrrd returns
    # each as a row.
    frame = header.get("measurement frame")
    frame = None if frame is None else np.asarray(frame, dtype=float).T
    gradients = geometry.nrrd_gradients_to_ras(raw, frame, header["space"])
    norms = np.linalg.norm(gradients, axis=1)
    # Slicer's convention: a gradient's squared norm scales the nominal b-value.
    bvals = bmax * norms**2
    bvecs = np.divide(gradients, norms[:, None], out=np.zeros_like(gradients), where=norms[:, None] > 1e-6)
    bvals[norms <= 1e-6] = 0.0
    return bvals, bvecs


def _write_nrrd_dwi(dwi, path):
    import nrrd

    directions, origin = geometry.nrrd_from_affine(dwi.affine)
    bmax = float(dwi.bvals.max()) if dwi.bvals.size else 0.0
    scale = np.sqrt(np.divide(dwi.bvals, bmax, out=np.zeros_like(dwi.bvals), where=bmax > 0))
    gradients_lps = (geometry.LPS_TO_RAS @ dwi.bvecs.T).T * scale[:, None]
    header = {
        "type": "float",
        "space": "left-posterior-superior",
        "space directions": np.vstack([np.full(3, np.nan), directions]),
        "space origin": origin,
        "kinds": ["list", "domain", "domain", "domain"],
        "measurement frame": np.eye(3),
        "modality": "DWMRI",
        "DWMRI_b-value": f"{bmax:g}",
    }
    for n, g in enumerate(gradients_lps):
        header[f"DWMRI_gradient_{n:04d}"] = " ".join(f"{v:.8f}" for v in g)
    data = np.moveaxis(np.asarray(dwi.data, dtype=np.float32), 3, 0)
    with atomic_path(path) as tmp:
        nrrd.write(str(tmp), data, header)


# --------------------------------------------------------------------------------------------------------------
# GRE
# --------------------------------------------------------------------------------------------------------------
@dataclass
class GRE:
    """Gradient-echo magnitude and phase.

    Attributes
    ----------
    magnitude, phase : ndarray, shape (i, j, k, echoes), float32
        Phase as stored: its scaling (radians, scanner integers, other) is interpreted by `ALSQuantLib.qsm`.
    affine : ndarray, shape (4, 4)
    echo_times : ndarray, shape (echoes,), seconds
    field_strength : float, tesla
    source : str
    metadata : dict
        The first phase file's BIDS sidecar.
    phase_units : str or None
        The phase's units when known (``"radians"`` from real and imaginary parts, `from_complex`); None: as
        stored, read by `ALSQuantLib.qsm.scale_phase`.
    """

    magnitude: np.ndarray
    phase: np.ndarray
    affine: np.ndarray
    echo_times: np.ndarray
    field_strength: float
    source: str = ""
    metadata: dict = field(default_factory=dict)
    phase_units: str = None

    @classmethod
    def from_complex(cls, real, imaginary, affine, echo_times, field_strength, source="", metadata=None):
        """A GRE from real and imaginary parts (as GE and Philips export them): magnitude |z|, phase arg z in
        radians."""
        name = source or "GRE"
        real, imaginary = _as_echoes(real, f"{name} real part"), _as_echoes(imaginary, f"{name} imaginary part")
        if real.shape != imaginary.shape:
            raise InputError(f"{name}: real part {real.shape} and imaginary part {imaginary.shape} differ in shape")
        real, imaginary = real.astype(np.float32), imaginary.astype(np.float32)
        if not np.any(real) and not np.any(imaginary):
            raise InputError(f"{name}: the real and imaginary parts are all zero")
        return cls(
            np.hypot(real, imaginary),
            np.arctan2(imaginary, real),
            affine,
            echo_times,
            field_strength,
            source=source,
            metadata=metadata or {},
            phase_units="radians",
        )

    def __post_init__(self):
        name = self.source or "GRE"
        self.magnitude = _as_echoes(self.magnitude, f"{name} magnitude")
        self.phase = _as_echoes(self.phase, f"{name} phase")
        self.affine = np.asarray(self.affine, dtype=float)
        self.echo_times = np.atleast_1d(np.asarray(self.echo_times, dtype=float))
        if self.magnitude.shape != self.phase.shape:
            raise InputError(
                f"{name}: magnitude {self.magnitude.shape} and phase {self.phase.shape} must have the same shape"
            )
        check_echo_times(self.echo_times, self.magnitude.shape[3], name)
        check_field_strength(self.field_strength, name)
        self.field_strength = float(self.field_strength)

    @property
    def b0_direction(self):
        """B0 in the frame of the image axes (see `geometry.b0_direction_voxel`)."""
        return geometry.b0_direction_voxel(self.affine)


def _as_echoes(array, name):
    array = np.asarray(array)
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4:
        raise InputError(f"{name}: expected 3D (one echo) or 4D (echoes last), got shape {array.shape}")
    return array


def check_echo_times(echo_times, n_echoes, name="GRE"):
    """Refuse echo times that are missing, non-positive, in milliseconds, or not one per echo."""
    echo_times = np.atleast_1d(np.asarray(echo_times, dtype=float))
    if echo_times.size != n_echoes:
        raise InputError(f"{name}: {n_echoes} echoes but {echo_times.size} echo times; expected one per echo")
    if not np.all(np.isfinite(echo_times)) or np.any(echo_times <= 0):
        raise InputError(f"{name}: echo times must be positive seconds, got {echo_times.tolist()}")
    if np.any(echo_times > 0.2):
        raise InputError(
            f"{name}: echo times {echo_times.tolist()} look like milliseconds; give them in seconds "
            f"(e.g. {echo_times[0] / 1000:g} for {echo_times[0]:g} ms)"
        )
    if echo_times.size > 1 and np.any(np.diff(echo_times) <= 0):
        raise InputError(f"{name}: echo times must increase, got {echo_times.tolist()}")
    return echo_times


def check_field_strength(field_strength, name="GRE"):
    """Refuse a missing or implausible field strength (tesla)."""
    if field_strength is None or not np.isfinite(field_strength) or not 0.1 <= float(field_strength) <= 21.1:
        raise InputError(f"{name}: field strength must be given in tesla (0.1 to 21.1), got {field_strength!r}")
    return float(field_strength)


def sidecar_path(image_path):
    """The BIDS JSON sidecar of an image: same stem, ``.json``."""
    return strip_image_suffix(image_path).with_suffix(".json")


def read_sidecar(image_path):
    """The image's BIDS JSON sidecar as a dict, or an empty dict when there is none."""
    path = sidecar_path(image_path)
    return read_json(path) if path.is_file() else {}


def gre_parts(magnitude=None, phase=None, real=None, imaginary=None):
    """The GRE's files as {part: [paths]}: magnitude and phase, or real and imaginary, as many of one as of the
    other; refused otherwise."""
    given = {"magnitude": magnitude, "phase": phase, "real": real, "imaginary": imaginary}
    parts = {}
    for name, value in given.items():
        paths = [Path(p) for p in (value if isinstance(value, (list, tuple)) else [] if value is None else [value])]
        if paths:
            parts[name] = paths
    if set(parts) not in ({"magnitude", "phase"}, {"real", "imaginary"}):
        raise InputError(
            f"GRE: give magnitude and phase, or real and imaginary parts (got {', '.join(parts) or 'none'})"
        )
    (first, first_paths), (second, second_paths) = parts.items()
    if len(first_paths) != len(second_paths):
        raise InputError(f"GRE: {len(first_paths)} {first} files but {len(second_paths)} {second} files")
    return parts


def read_gre(magnitude=None, phase=None, *, real=None, imaginary=None, echo_times=None, field_strength=None):
    """Read a GRE from magnitude and phase files, or from real and imaginary parts.

    Parameters
    ----------
    magnitude, phase : path or list of paths
        One 3D/4D file each (echoes along the 4th axis), or one file per echo in echo order.
    real, imaginary : path or list of paths
        Instead of magnitude and phase (BIDS ``part-real``/``part-imag``), laid out the same way.
    echo_times : sequence of float, optional
        Seconds. Default: ``EchoTime`` from each phase (or magnitude, or part's) file's BIDS sidecar; a 4D file's
        sidecar may hold a list.
    field_strength : float, optional
        Tesla. Default: ``MagneticFieldStrength`` from the sidecar.

    Returns
    -------
    GRE
    """
    parts = gre_parts(magnitude, phase, real, imaginary)
    polar = "phase" in parts
    names = ("magnitude", "phase") if polar else ("real part", "imaginary part")
    first_paths, second_paths = parts.values()
    firsts, seconds, affine, sidecars = [], [], None, []
    for first_path, second_path in zip(first_paths, second_paths):
        first, first_affine = load_image(first_path, ndim=(3, 4), what=f"GRE {names[0]}")
        second, second_affine = load_image(second_path, ndim=(3, 4), what=f"GRE {names[1]}")
        if first.shape != second.shape:
            raise InputError(
                f"GRE {names[0]} {first_path} {first.shape} and {names[1]} {second_path} {second.shape} differ in shape"
            )
        geometry.require_grid(
            f"GRE {names[1]} {second_path}", (second.shape, second_affine), {names[0]: (first.shape, first_affine)}
        )
        if affine is not None:
            geometry.require_grid(
                f"GRE echo {first_path}", (first.shape, first_affine), {"first echo": (firsts[0].shape, affine)}
            )
        affine = first_affine
        firsts.append(_as_echoes(first, str(first_path)))
        seconds.append(_as_echoes(second, str(second_path)))
        sidecars.append(read_sidecar(second_path) or read_sidecar(first_path))
    if echo_times is None:
        echo_times = []
        for sidecar, path in zip(sidecars, second_paths):
            if "EchoTime" not in sidecar:
                raise InputError(
                    f"GRE {names[1]} {path}: no echo time given and no EchoTime in {sidecar_path(path)}; "
                    "give the echo times in seconds (--te)"
                )
            echo_times.extend(np.atleast_1d(sidecar["EchoTime"]).tolist())
    if field_strength is None:
        field_strength = next((s["MagneticFieldStrength"] for s in sidecars if "MagneticFieldStrength" in s), None)
        if field_strength is None:
            raise InputError(
                f"GRE {names[1]} {second_paths[0]}: no field strength given and no MagneticFieldStrength in its "
                "sidecar; give the field strength in tesla (--b0)"
            )
    make = GRE if polar else GRE.from_complex
    return make(
        np.concatenate(firsts, axis=3),
        np.concatenate(seconds, axis=3),
        affine,
        echo_times,
        field_strength,
        source=str(second_paths[0]),
        metadata=sidecars[0],
    )


# --------------------------------------------------------------------------------------------------------------
# Tables and colour tables
# --------------------------------------------------------------------------------------------------------------
def _delimiter(path):
    return "\t" if Path(path).suffix.lower() == ".tsv" else ","


def write_table(path, rows, columns=None):
    """Write dict rows as CSV or TSV (by suffix), atomically. Columns default to the keys in first-seen order."""
    rows = list(rows)
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    text = StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns, delimiter=_delimiter(path), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    write_text(path, text.getvalue())


def read_table(path):
    """Read a CSV or TSV file (by suffix) as a list of dicts of strings."""
    path = _existing(path, "table")
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle, delimiter=_delimiter(path)))


def write_color_table(path, entries):
    """Write labels as a Slicer colour table (``index name R G B A`` per line).

    Parameters
    ----------
    entries : iterable of (value, name, (r, g, b))
    """
    lines = ["# Color table file written by ALSQuant", "# index name R G B A"]
    for value, name, (r, g, b) in entries:
        alpha = 0 if value == 0 else 255
        lines.append(f"{int(value)} {name.replace(' ', '_')} {int(r)} {int(g)} {int(b)} {alpha}")
    write_text(path, "\n".join(lines) + "\n")
