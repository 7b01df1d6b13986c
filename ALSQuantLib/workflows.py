"""The steps, each with one runner: read the inputs → compute → write the outputs atomically → provenance.

`dki_step`, `qsm_step` and `label_step` are what ``alsquant dki|qsm|label`` run, what the pipeline runs for each
subject, and what the Slicer modules' background jobs run (through the same commands). The science modules
(`ALSQuantLib.dki`, `ALSQuantLib.qsm`, `ALSQuantLib.atlas`) compute and return arrays; only this module writes a
step's files.

Each step locks its folder while it runs and writes ``provenance.json`` last: its options as ``dataclasses.asdict``,
the other values that shaped it, the SHA-256 of every input as it was read, each output's size and SHA-256, what it
found, and the software versions. A step whose record matches the options, the arguments and the inputs' checksums,
with every output there and unchanged, is not run again; a damaged or missing output makes it run again.
"""

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import atlas as atlas_lib
from . import dki, geometry, io, motion, outputs, provenance, qsm, report
from .errors import InputError
from .registration import Registration

log = logging.getLogger(__name__)

RECORD = "provenance.json"
QSM_OUTPUTS = ("susceptibility", "local_field", "mask")
LABEL_OUTPUTS = ("labels.ctbl", "roi_stats.csv", "quality.json")
LABEL_PICTURE = "labels.png"
MAPS_PICTURE = "maps.png"
MOTION_PICTURE = "motion.png"


@dataclass
class StepResult:
    """What a step did: its folder, the files it wrote (or found current), its provenance record, whether it ran."""

    step: str
    folder: Path
    outputs: list
    record: dict
    ran: bool


def _current(record_path, options, arguments, inputs):
    """The record at `record_path` if it matches these options, arguments and input checksums and every output it
    lists is there with its recorded size and SHA-256; else None (the step runs again)."""
    if not record_path.exists():
        return None
    try:
        record = io.read_json(record_path)
    except InputError:
        return None
    if record.get("options") != io.json_ready(dataclasses.asdict(options)) or record.get("arguments") != io.json_ready(
        arguments
    ):
        return None
    recorded = {name: entry.get("sha256") for name, entry in record.get("inputs", {}).items()}
    if recorded != {name: entry["sha256"] for name, entry in inputs.items()}:
        return None
    for entry in record.get("outputs", []):
        path = record_path.parent / str(entry.get("path", "")) if isinstance(entry, dict) else None
        if path is None or not path.is_file() or path.stat().st_size != entry.get("bytes"):
            log.info("%s: output %s missing or damaged; the step runs again", record.get("step"), path)
            return None
        if provenance.file_sha256(path) != entry.get("sha256"):
            log.info("%s: output %s changed since it was written; the step runs again", record.get("step"), path)
            return None
    return record


def _refuse_overwriting_inputs(out_dir, planned, inputs):
    """Refuse an output folder in which a step would write over one of its inputs."""
    resolved = {Path(p).resolve() for p in inputs.values()}
    for name in planned:
        if (Path(out_dir) / name).resolve() in resolved:
            raise InputError(f"output {Path(out_dir) / name} would overwrite an input; choose another output folder")


def run_step(step, out_dir, options, inputs, compute, *, arguments=None, planned=()):
    """Run one step: `compute(folder) → (output paths, results)`, then its provenance record, written last.

    Parameters
    ----------
    step : str
    out_dir : path
    options : dataclass instance
    inputs : dict name → path
        The files the step reads (hashed into the record).
    compute : callable(Path) → (list of Path, dict)
    arguments : dict, optional
        Other values that shape the result (recorded and compared like the options).
    planned : iterable of str
        Names of the files the step may write, checked against the inputs before anything is computed.

    The folder is checked (writable, with room) and locked first: a second run on it is refused while this one
    holds it, and temporaries a killed run left are removed. The inputs are hashed before `compute` reads them and
    again after: a file that changed meanwhile fails the step, so a record names exactly the bytes that were read.
    A step whose record is current (`_current`: same options, arguments and input checksums, every output there
    with its recorded checksum) is not run again.

    Returns
    -------
    StepResult
    """
    folder = Path(out_dir)
    arguments = arguments or {}
    inputs = {name: Path(path) for name, path in inputs.items() if path is not None}
    for name, path in inputs.items():
        if not path.is_file():
            raise InputError(f"{step}: input {name} {path}: file not found")
    _refuse_overwriting_inputs(folder, planned, inputs)
    with outputs.locked(folder, f"{step} output folder"):
        read = provenance.checksums(inputs)
        record_path = folder / RECORD
        record = _current(record_path, options, arguments, read)
        if record is not None:
            log.info("%s: current, skipped", step)
            return StepResult(step, folder, [folder / e["path"] for e in record["outputs"]], record, False)
        outputs.check_room(folder)
        if record_path.exists():
            record_path.unlink()  # a stale record must not vouch for half-rewritten outputs
        start = time.perf_counter()
        written, results = compute(folder)
        results = {**results, "seconds": time.perf_counter() - start}
        changed = [name for name, entry in provenance.checksums(inputs).items() if entry != read[name]]
        if changed:
            raise InputError(
                f"{step}: input(s) {', '.join(f'{n} {inputs[n]}' for n in changed)} changed while the step was "
                "reading them; nothing was recorded, run the step again"
            )
        record = provenance.record(
            step,
            options=options,
            inputs=read,
            outputs=provenance.output_entries(folder, written),
            arguments=arguments,
            results=results,
        )
        io.write_json(record_path, record)
    log.info("%s: done in %.1f s", step, results["seconds"])
    return StepResult(step, folder, list(written), io.json_ready(record), True)


# ----------------------------------------------------------------------------------------------------------------
# DKI
# ----------------------------------------------------------------------------------------------------------------
def dki_step(dwi, out_dir, options=None, *, bval=None, bvec=None, mask=None, maps=dki.DKI_MAPS, progress=None):
    """Fit DKI to a DWI file and write the maps (``<map>.nii.gz``) and the brain mask (``mask.nii.gz``). The DWI's
    BIDS sidecar, when there is one, is read for ``PartialFourier`` and ``PhaseEncodingDirection``
    (`dki.reconstruct`).

    Parameters
    ----------
    dwi : path
        NIfTI (with FSL ``.bval``/``.bvec``, by default beside it with the same stem) or NRRD.
    options : dki.DKIOptions, optional
    mask : path, optional
        Brain mask on the DWI's grid (default: `masks.brain_mask_from_b0`).
    maps : sequence of str
        Maps to write (`dki.DKI_MAPS`); those a DTI-only fit lacks are left out and listed in the record.
    """
    options = options or dki.DKIOptions()
    maps = [m.strip().lower() for m in maps]
    unknown = sorted(set(maps) - set(dki.DKI_MAPS))
    if unknown:
        raise InputError(f"maps: unknown map(s) {', '.join(unknown)}; expected some of {', '.join(dki.DKI_MAPS)}")
    dwi = Path(dwi)
    if not dwi.name.endswith(io.NRRD_SUFFIXES):
        stem = io.strip_image_suffix(dwi)
        bval, bvec = bval or stem.with_suffix(".bval"), bvec or stem.with_suffix(".bvec")

    sidecar = io.sidecar_path(dwi)

    def compute(folder):
        data = io.read_dwi(dwi, bval=bval, bvec=bvec)
        given = io.load_mask(mask, data.data.shape, data.affine, matching="DWI") if mask else None
        tags = io.read_sidecar(dwi)
        fit, used_mask, details = dki.reconstruct(
            data,
            options,
            mask=given,
            partial_fourier=tags.get("PartialFourier"),
            phase_encoding=tags.get("PhaseEncodingDirection"),
            progress=progress,
        )
        written = [m for m in maps if m in fit.map_names]
        paths = [folder / f"{m}.nii.gz" for m in written] + [folder / "mask.nii.gz"]
        for name, path in zip(written, paths):
            io.save_image(path, getattr(fit, name), data.affine, description=f"ALSQuant {name}")
        io.save_image(paths[-1], used_mask, data.affine, dtype=np.uint8)
        if "motion_poses" in details:
            poses = np.array(details["motion_poses"])
            paths.append(folder / "motion.tsv")
            phase = None
            if "phase_encoding_axis" in details:
                phase = motion.phase_direction(data.affine, "ijk".index(details["phase_encoding_axis"]))
            table = motion.write_table(paths[-1], poses, data.bvals, data.affine, data.data.shape[:3], phase)
            paths.append(report.motion_figure(folder / MOTION_PICTURE, table))
        return paths, {**details, "maps": written, "not_available": [m for m in maps if m not in written]}

    inputs = {"dwi": dwi, "bval": bval, "bvec": bvec, "mask": mask}
    if sidecar.is_file():  # its PartialFourier and PhaseEncodingDirection steer Gibbs removal and eddy currents
        inputs["sidecar"] = sidecar
    planned = [f"{m}.nii.gz" for m in maps] + ["mask.nii.gz", RECORD]
    planned += ["motion.tsv", MOTION_PICTURE] if options.motion_correction else []
    return run_step("dki", out_dir, options, inputs, compute, arguments={"maps": maps}, planned=planned)


# ----------------------------------------------------------------------------------------------------------------
# QSM
# ----------------------------------------------------------------------------------------------------------------
def qsm_step(
    magnitude,
    phase,
    out_dir,
    options=None,
    *,
    real=None,
    imaginary=None,
    echo_times=None,
    field_strength=None,
    mask=None,
    progress=None,
):
    """Reconstruct susceptibility from GRE files; write ``susceptibility.nii.gz`` (ppm) with its JSON sidecar (units,
    reference), ``local_field.nii.gz`` (ppm) and ``mask.nii.gz``; from real and imaginary parts also
    ``magnitude.nii.gz`` (the first echo's, for the labelling).

    Parameters
    ----------
    magnitude, phase : path or sequence of paths, or None
        One 3D/4D file each, or one file per echo in echo order.
    options : qsm.QSMOptions, optional
    real, imaginary : path or sequence of paths, optional
        Instead of magnitude and phase (both None then).
    echo_times : sequence of float, optional
        Seconds; default ``EchoTime`` from the BIDS sidecars (which are then inputs of the step).
    field_strength : float, optional
        Tesla; default ``MagneticFieldStrength`` from the sidecar.
    mask : path, optional
        Brain mask on the GRE's grid.
    """
    options = options or qsm.QSMOptions()
    parts = io.gre_parts(magnitude, phase, real, imaginary)
    complex_parts = "real" in parts

    def compute(folder):
        gre = io.read_gre(**parts, echo_times=echo_times, field_strength=field_strength)
        given = io.load_mask(mask, gre.phase.shape, gre.affine, matching="GRE phase") if mask else None
        result = qsm.reconstruct_qsm(gre, options, mask=given, progress=progress)
        paths = [folder / f"{name}.nii.gz" for name in QSM_OUTPUTS]
        io.save_image(paths[0], result.susceptibility, gre.affine, description="ALSQuant chi ppm")
        io.save_image(paths[1], result.local_field, gre.affine, description="ALSQuant local field ppm")
        io.save_image(paths[2], result.mask, gre.affine, dtype=np.uint8)
        sidecar = {"Units": "ppm", "Reference": result.parameters["reference"], "ReferenceOption": options.reference}
        paths.append(folder / "susceptibility.json")
        io.write_json(paths[-1], sidecar)
        if complex_parts:
            paths.append(folder / "magnitude.nii.gz")
            io.save_image(paths[-1], gre.magnitude[..., 0], gre.affine)
        return paths, {**result.parameters, "timings_s": result.timings}

    inputs = {f"{name}_{i + 1}": p for name, paths in parts.items() for i, p in enumerate(paths)}
    for name, path in list(inputs.items()):
        if io.sidecar_path(path).is_file():
            inputs[f"{name}_sidecar"] = io.sidecar_path(path)
    inputs["mask"] = mask
    arguments = {
        "echo_times_s": list(echo_times) if echo_times is not None else None,
        "field_strength_t": field_strength,
    }
    planned = [f"{name}.nii.gz" for name in QSM_OUTPUTS] + ["susceptibility.json", RECORD]
    planned += ["magnitude.nii.gz"] if complex_parts else []
    return run_step("qsm", out_dir, options, inputs, compute, arguments=arguments, planned=planned)


REGISTRATION_RECORD = "registration.json"
"""The brain stage's registrations (file names and similarity, `Registration.as_dict`), which the labelling of the
same subject reuses (`label_step`'s ``registrations``)."""


def _first_echo(path, what):
    """A GRE image (3D, or 4D with echoes last): its first echo and affine."""
    data, affine = io.load_image(path, ndim=(3, 4), what=what)
    return (data[..., 0] if data.ndim == 4 else data), affine


def brain_step(reference, out_dir, options=None, *, magnitude=None, real=None, imaginary=None, progress=None):
    """The atlas template's brain on the GRE's grid (`atlas.template_brain_mask`), written as ``brain_gre.nii.gz``:
    a brain mask for the QSM that the scalp and neck around a real brain cannot mislead, as the magnitude's own
    threshold is. The registrations it needs (the reference to the template, the GRE to the reference) are kept in
    the folder with ``registration.json``, for the labelling (`label_step`'s ``registrations``).

    Parameters
    ----------
    reference : path
        The subject's FA (or T1-like image, with ``options.reference_contrast`` ``"T1w"``) in DWI space.
    options : atlas.LabelingOptions, optional
        The atlas and the registration's settings, as the labelling uses them.
    magnitude : path, optional
        The GRE magnitude (its first echo if 4D); else the first echo's `real` and `imaginary` parts.
    """
    options = options or atlas_lib.LabelingOptions()
    atlas = atlas_lib.atlas_for(options)
    if magnitude is None and (real is None or imaginary is None):
        raise InputError("brain mask from the template: give the GRE magnitude, or its real and imaginary parts")

    def compute(folder):
        fa, fa_affine = io.load_image(reference, ndim=3, what="reference")
        if magnitude is not None:
            gre, gre_affine = _first_echo(magnitude, "GRE magnitude")
        else:
            (re, gre_affine), (im, _) = _first_echo(real, "GRE real part"), _first_echo(imaginary, "GRE imaginary part")
            gre = np.hypot(re, im)
        made = atlas_lib.register_subject(
            fa, fa_affine, atlas, options, gre=(gre, gre_affine), workdir=folder, progress=progress
        )
        try:
            kept = [made[0].kept(folder, "template_"), made[1].kept(folder, "link_")]
        finally:
            for registration in made:
                registration.cleanup()
        mask = atlas_lib.template_brain_mask(gre.shape, gre_affine, atlas, [k for k, _ in kept], options)
        path, record = folder / "brain_gre.nii.gz", folder / REGISTRATION_RECORD
        io.save_image(path, mask, gre_affine, dtype=np.uint8)
        io.write_json(record, {"template": kept[0][0].as_dict(), "link": kept[1][0].as_dict()})
        return [path, record, *kept[0][1], *kept[1][1]], {"brain_voxels": int(mask.sum())}

    inputs = {"reference": reference, "magnitude": magnitude, "real": real, "imaginary": imaginary}
    planned = ["brain_gre.nii.gz", REGISTRATION_RECORD, RECORD]
    return run_step("brain", out_dir, options, inputs, compute, planned=planned)


def _registrations(record):
    """The registrations a brain stage kept (`brain_step`), from its ``registration.json``: (template, link), and
    the files they read (name → path), which become the labelling's inputs."""
    entries = io.read_json(record)
    made = [Registration.from_dict(entries[key], Path(record).parent) for key in ("template", "link")]
    files = {f"registration_{Path(p).name}": p for r in made for p in dict.fromkeys([*r.forward, *r.inverse])}
    return made, files


# ----------------------------------------------------------------------------------------------------------------
# Labelling
# ----------------------------------------------------------------------------------------------------------------
def write_labeling(out_dir, labeling, images=None, maps=None):
    """Write ``labels_<space>.nii.gz``, ``grey_matter_<space>.nii.gz`` (if any), ``labels.ctbl``, ``roi_stats.csv``,
    ``quality.json`` and, given `images` (space → (image, affine): the reference, the GRE magnitude), ``labels.png``
    (the labels over them, three planes, `report.labels_figure`), and given `maps` (name → (image, affine), each
    on a labelled grid), ``maps.png`` (the labels over each map); return the paths."""
    out_dir = Path(out_dir)
    written = []
    for space, (label_image, affine) in labeling.label_images.items():
        written.append(out_dir / f"labels_{space}.nii.gz")
        io.save_image(written[-1], label_image, affine, dtype=np.int16)
    for space, (mask, affine) in labeling.grey_matter.items():
        written.append(out_dir / f"grey_matter_{space}.nii.gz")
        io.save_image(written[-1], mask, affine, dtype=np.uint8)
    table, rows, quality = (out_dir / name for name in LABEL_OUTPUTS)
    io.write_color_table(table, labeling.table.as_list())
    io.write_table(rows, labeling.rows)
    io.write_json(
        quality,
        {
            "template_correlation": labeling.similarity,
            "volume_ratio": {f"{r}_{s}": v for (r, s), v in labeling.ratios.items()},
            "in_view": {f"{r}_{s}": v for (r, s), v in labeling.in_view.items()},
            "contrast_fingerprint": labeling.contrast,
            "grey_matter_share": {f"{r}_{s}_{space}": v for (r, s, space), v in labeling.grey_share.items()},
            "outside_brain": labeling.outside_brain,
            "local_similarity": {f"{r}_{s}": v for (r, s), v in labeling.local_similarity.items()},
            "flags": labeling.flags,
            "passed": labeling.passed,
        },
    )
    written += [table, rows, quality]
    images = images or {}
    panels = [
        (space, images[space][0], label_image, affine)
        for space, (label_image, affine) in labeling.label_images.items()
        if space in images
    ]
    if panels:
        verdict = "QC passed" if labeling.passed else f"QC flagged: {'; '.join(labeling.flags)}"
        written.append(report.labels_figure(out_dir / LABEL_PICTURE, panels, title=verdict))
    map_panels = [
        (name, image, label_image, affine)
        for name, (image, affine) in (maps or {}).items()
        for label_image, label_affine in labeling.label_images.values()
        if geometry.same_grid(image.shape, affine, label_image.shape, label_affine)
    ]
    if map_panels:
        written.append(report.labels_figure(out_dir / MAPS_PICTURE, map_panels, title="the maps measured, labels over"))
    return written


def _check_grids(reference, gre_magnitude, maps, map_masks, tissue_mask):
    """Every map and mask on the reference's or the GRE's grid, each map mask on its map's, from the headers: a
    wrong grid is refused before minutes of registration."""
    grids = {"reference": io.image_grid(reference, "reference")}
    if gre_magnitude:
        grids["GRE magnitude"] = io.image_grid(gre_magnitude, "GRE magnitude")
    checked = {f"map {name}": path for name, path in maps.items()}
    if tissue_mask:
        checked["tissue mask"] = tissue_mask
    for what, path in checked.items():
        grid = io.image_grid(path, what)
        if not any(geometry.same_grid(*grid, *other) for other in grids.values()):
            differences = "; ".join(
                f"against the {n}'s: {geometry.grid_difference(*grid, *g)}" for n, g in grids.items()
            )
            raise InputError(f"{what} {path}: on neither the reference's nor the GRE's grid ({differences})")
    for name, path in map_masks.items():
        map_grid = io.image_grid(maps[name], f"map {name}")
        geometry.require_grid(f"mask of map {name} {path}", io.image_grid(path, "mask"), {"map": map_grid})


def label_step(
    reference,
    out_dir,
    options=None,
    *,
    maps=None,
    map_masks=None,
    gre_magnitude=None,
    tissue_mask=None,
    subject="",
    keep_transforms=False,
    registrations=None,
    progress=None,
):
    """Label a subject with an atlas and measure maps in its regions (`atlas.label_subject`); write the labels,
    ``roi_stats.csv`` and ``quality.json`` (`write_labeling`).

    Parameters
    ----------
    reference : path
        The subject's FA (or T1-like image, with ``options.reference_contrast`` ``"T1w"``) in DWI space.
    options : atlas.LabelingOptions, optional
    maps : dict name → path, optional
        Maps to measure, on the reference's grid or the GRE's.
    map_masks : dict name → path, optional
        A mask per map: voxels outside it hold no value and are not measured (e.g. the DKI or QSM mask).
    gre_magnitude : path, optional
        GRE magnitude (first echo if 4D), rigidly linked to the reference.
    tissue_mask : path, optional
        Grey-matter mask on either grid (default: segmented from the GRE magnitude).
    keep_transforms : bool
        Keep the ANTs transforms (subject → atlas) in ``out_dir/transforms``.
    registrations : path, optional
        A brain stage's ``registration.json`` (`brain_step`, same reference, GRE magnitude and options): its
        registrations are used instead of registering again.
    """
    options = options or atlas_lib.LabelingOptions()
    maps, map_masks = dict(maps or {}), dict(map_masks or {})
    unknown = sorted(set(map_masks) - set(maps))
    if unknown:
        raise InputError(f"map masks {', '.join(unknown)}: no such map")
    atlas = atlas_lib.atlas_for(options)
    _check_grids(reference, gre_magnitude, maps, map_masks, tissue_mask)
    made, registration_files = _registrations(registrations) if registrations else (None, {})

    def compute(folder):
        valid = {
            name: io.load_image(path, ndim=3, what=f"mask of map {name}")[0] > 0 for name, path in map_masks.items()
        }
        loaded = {}
        for name, path in maps.items():
            data, affine = io.load_image(path, ndim=3, what=f"map {name}", allow_nonfinite=True)
            loaded[name] = (np.where(valid[name], data, np.nan) if name in valid else data, affine)
        images = {"reference": io.load_image(reference, ndim=3, what="reference")}
        if gre_magnitude:
            images["gre"] = _first_echo(gre_magnitude, "GRE magnitude")
        labeling = atlas_lib.label_subject(
            *images["reference"],
            atlas,
            options,
            maps=loaded,
            gre_magnitude=images.get("gre"),
            tissue_mask=io.load_image(tissue_mask, ndim=3, what="tissue mask") if tissue_mask else None,
            subject=subject,
            keep_transforms=folder / "transforms" if keep_transforms else None,
            registrations=made,
            workdir=folder,
            progress=progress,
        )
        results = {"flags": labeling.flags, "passed": labeling.passed, "template_correlation": labeling.similarity}
        return write_labeling(folder, labeling, images, loaded) + labeling.transforms, results

    inputs = {"reference": reference, "gre_magnitude": gre_magnitude, "tissue_mask": tissue_mask}
    inputs.update({f"map_{name}": path for name, path in maps.items()})
    inputs.update({f"mask_{name}": path for name, path in map_masks.items()})
    inputs.update({f"atlas_{name}": path for name, path in atlas.files().items()})
    inputs["atlas_regions"] = options.regions_json
    inputs.update(registration_files, **({"registrations": registrations} if registrations else {}))
    arguments = {"subject": subject, "keep_transforms": bool(keep_transforms)}
    planned = [f"labels_{s}.nii.gz" for s in ("reference", "gre")] + [
        f"grey_matter_{s}.nii.gz" for s in ("reference", "gre")
    ]
    planned += [*LABEL_OUTPUTS, LABEL_PICTURE, MAPS_PICTURE, RECORD]
    return run_step("label", out_dir, options, inputs, compute, arguments=arguments, planned=planned)
