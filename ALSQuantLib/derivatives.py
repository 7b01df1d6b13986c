"""A subject's results under BIDS-derivative names, for tools that read BIDS (pybids, fMRIPrep-style QC, a lab's
own scripts).

The pipeline works in one folder per stage (``dki``, ``qsm``, ``label``: what it resumes from); this module gives the
finished results their BIDS names in a derivative dataset beside them::

    dataset_description.json                      GeneratedBy ALSQuant (its version), the source dataset
    sub-01[/ses-1]/dwi/sub-01[_ses-1]_model-dki_param-mk_dwimap.nii.gz    (fa, md alike; BEP016's names)
                       sub-01_desc-brain_mask.nii.gz                       the DKI's brain mask
                       sub-01_desc-regions_dseg.nii.gz (+ .tsv)            the atlas regions on the DWI grid
    sub-01[/ses-1]/anat/sub-01_Chimap.nii.gz (+ .json: Units, Reference)   susceptibility, ppm
                        sub-01_desc-brain_mask.nii.gz, _desc-regions_dseg, _label-GM_mask   on the GRE grid

Each file is a hard link to the stage's file (no second copy on disk; a copy where the file system has no hard
links), renewed when the stage writes a new one. The stage folders and the pipeline's own files are listed in
``.bidsignore``.
"""

import os
import shutil
from pathlib import Path

from . import __version__, io, outputs
from .errors import InputError

BIDS_VERSION = "1.10.0"
DESCRIPTION = "dataset_description.json"
IGNORE = ".bidsignore"
IGNORED = ("subjects/", "logs/", "dki/", "brain/", "qsm/", "label/", "*.html", "*.csv", "*.json", ".alsquant.lock")
"""The pipeline's own files in a derivative dataset: stage folders, pages, tables, records (``*.json`` at the top:
the BIDS files' sidecars lie deeper, and ``dataset_description.json`` is always read)."""

DWI_MAPS = {
    "mk": ("mean kurtosis", "n/a"),
    "fa": ("fractional anisotropy", "n/a"),
    "md": ("mean diffusivity", "mm^2/s"),
    "ak": ("axial kurtosis", "n/a"),
    "rk": ("radial kurtosis", "n/a"),
    "ad": ("axial diffusivity", "mm^2/s"),
    "rd": ("radial diffusivity", "mm^2/s"),
}
"""DKI map → (description, units) of its ``_dwimap`` sidecar."""


def subject_label(subject):
    """``sub-<label>`` for a participant name: "sub-01" stays, "patient_7" becomes "sub-patient7"."""
    label = "".join(c for c in str(subject).removeprefix("sub-") if c.isalnum())
    if not label:
        raise InputError(f"subject {subject!r}: no letters or digits to make a BIDS subject label of")
    return f"sub-{label}"


def write_description(root, source=None):
    """``dataset_description.json`` of the derivative dataset at `root` (and its ``.bidsignore``), written only when
    its content changes; `source` is the raw dataset's folder, when there is one."""
    root = Path(root)
    description = {
        "Name": "ALSQuant derivatives",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "ALSQuant", "Version": __version__, "Description": "DKI, QSM and atlas labels"}],
    }
    if source is not None:
        description["SourceDatasets"] = [{"URL": Path(source).resolve().as_uri()}]
    _write_if_changed(root / DESCRIPTION, description)
    ignore = "\n".join(IGNORED) + "\n"
    if not (root / IGNORE).is_file() or (root / IGNORE).read_text() != ignore:
        io.write_text(root / IGNORE, ignore)


def _write_if_changed(path, content):
    try:
        if io.read_json(path) == io.json_ready(content):
            return
    except InputError:
        pass
    io.write_json(path, content)


def _link(source, target):
    """`target` made the same file as `source` (a hard link, or a copy), atomically; nothing done if it is."""
    if target.exists() and os.path.samefile(source, target):
        return
    with outputs.atomic_path(target) as tmp:
        tmp.unlink()
        try:
            os.link(source, tmp)
        except OSError:  # no hard links here (another device, a FAT disk): a copy
            shutil.copyfile(source, tmp)


def _dseg_table(color_table, target):
    """The ``_dseg.tsv`` beside `target`: index and name of each label of the run's colour table."""
    rows = []
    for line in Path(color_table).read_text().splitlines():
        fields = line.split()
        if fields and not line.startswith("#") and int(fields[0]) != 0:
            rows.append({"index": int(fields[0]), "name": fields[1]})
    io.write_table(target, rows, ["index", "name"])


def export_subject(subject_dir, root, subject, session=None, sources=()):
    """Give the results in `subject_dir` (a `pipeline.run_subject` folder) their BIDS-derivative names under `root`.

    Parameters
    ----------
    subject_dir, root : path
    subject : str
        The participant (`subject_label` makes it a BIDS label).
    session : str, optional
        The session's label ("1" or "ses-1").
    sources : sequence of path
        The subject's input files, listed in each sidecar's ``Sources``.

    Returns
    -------
    list of Path
        The files written or renewed under `root`.
    """
    subject_dir, root = Path(subject_dir), Path(root)
    prefix = subject_label(subject)
    folder = root / prefix
    if session:
        session = f"ses-{str(session).removeprefix('ses-')}"
        prefix, folder = f"{prefix}_{session}", folder / session
    uris = [Path(p).resolve().as_uri() for p in sources]
    dwi, anat, label = folder / "dwi", folder / "anat", subject_dir / "label"
    placed = []
    for name, (description, units) in DWI_MAPS.items():
        source = subject_dir / "dki" / f"{name}.nii.gz"
        if source.is_file():
            target = dwi / f"{prefix}_model-dki_param-{name}_dwimap.nii.gz"
            sidecar = {"Description": f"{description} (DKI)", "Units": units, "Sources": uris}
            placed += _place(source, target, sidecar)
    chi = subject_dir / "qsm" / "susceptibility.nii.gz"
    sidecar = {"Description": "magnetic susceptibility (QSM)", "Units": "ppm", "Sources": uris}
    if io.sidecar_path(chi).is_file():
        sidecar.update(io.read_sidecar(chi))
    placed += _place(chi, anat / f"{prefix}_Chimap.nii.gz", sidecar)
    for source, target in (
        (subject_dir / "dki" / "mask.nii.gz", dwi / f"{prefix}_desc-brain_mask.nii.gz"),
        (subject_dir / "qsm" / "mask.nii.gz", anat / f"{prefix}_desc-brain_mask.nii.gz"),
        (label / "grey_matter_reference.nii.gz", dwi / f"{prefix}_label-GM_mask.nii.gz"),
        (label / "grey_matter_gre.nii.gz", anat / f"{prefix}_label-GM_mask.nii.gz"),
    ):
        placed += _place(source, target)
    for space, target_folder in (("reference", dwi), ("gre", anat)):
        target = target_folder / f"{prefix}_desc-regions_dseg.nii.gz"
        placed += _place(label / f"labels_{space}.nii.gz", target)
        if target.is_file():
            _dseg_table(label / "labels.ctbl", target.with_name(target.name.replace(".nii.gz", ".tsv")))
    return placed


def _place(source, target, sidecar=None):
    if not source.is_file():
        return []
    _link(source, target)
    if sidecar is None:
        return [target]
    _write_if_changed(io.sidecar_path(target), sidecar)
    return [target, io.sidecar_path(target)]
