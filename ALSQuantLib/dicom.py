"""DICOM in: a subject's DICOM series converted by dcm2niix (Rorden's converter, the field's standard; the PyPI
package ``dcm2niix`` ships its binary) and filed into the BIDS layout `pipeline.find_subject` reads.

dcm2niix writes one NIfTI per series (per echo, per part) with a JSON sidecar (echo time in seconds, field
strength, image type) and, for a DWI, FSL ``.bval``/``.bvec`` files; it marks a phase image ``_ph``, real and
imaginary parts ``_real`` and ``_imaginary``, and echoes ``_e2``, ... whatever the vendor stores them as (Siemens
image types, GE's and Philips's private tags). `import_dicom` files them:

* a series with b-values → ``dwi/<sub>[_ses-*][_run-N]_dwi.nii.gz`` with its ``.bval``, ``.bvec`` and ``.json``;
* a protocol with a phase (or real and imaginary parts) → the GRE: ``anat/<sub>[_ses-*][_run-N][_echo-N]_part-
  mag|phase|real|imag_T2starw.nii.gz`` with sidecars;
* everything else is left out and named.
"""

import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from . import io, outputs
from .errors import InputError

log = logging.getLogger(__name__)

PARTS = {"_ph": "phase", "_real": "real", "_imaginary": "imag"}
"""dcm2niix's suffix of each GRE part (the magnitude has none) → BIDS ``part-`` label."""


def dcm2niix_path():
    """The dcm2niix executable: on the PATH, or beside this Python (a virtual environment's ``bin``); else an
    `InputError` saying how to install it."""
    found = shutil.which("dcm2niix") or shutil.which("dcm2niix", path=str(Path(sys.executable).parent))
    if not found:
        raise InputError("dcm2niix not found: install it (pip install dcm2niix, or your system's dcm2niix package)")
    return found


def _convert(dicom_dir, folder):
    """dcm2niix on `dicom_dir` into `folder` (compressed NIfTI, BIDS sidecars, anonymised): the NIfTI files."""
    command = [dcm2niix_path(), "-z", "y", "-b", "y", "-ba", "y", "-f", "%s_%p", "-o", str(folder), str(dicom_dir)]
    done = subprocess.run(command, capture_output=True, text=True)
    log.info("dcm2niix: %s", done.stdout.strip().replace("\n", " | "))
    if done.returncode != 0:
        raise InputError(
            f"DICOM {dicom_dir}: dcm2niix failed ({done.returncode}): {done.stderr.strip() or done.stdout}"
        )
    found = sorted(folder.glob("*.nii.gz"))
    if not found:
        raise InputError(f"DICOM {dicom_dir}: dcm2niix found no image series there")
    return found


def _stem(path):
    return path.name[: -len(".nii.gz")]


def _part(path, sidecar):
    """(BIDS part, echo number or 0) of a converted GRE file: the part from dcm2niix's suffix, the echo from the
    sidecar's ``EchoNumber`` (else dcm2niix's ``_eN``)."""
    stem = _stem(path)
    part = next((p for s, p in PARTS.items() if stem.endswith(s)), "mag")
    stem = next((stem[: -len(s)] for s in PARTS if stem.endswith(s)), stem)
    head, _, tail = stem.rpartition("_e")
    return part, int(sidecar.get("EchoNumber") or (tail if head and tail.isdigit() else 0))


def _sorted_files(converted):
    """The converted series in series order: DWIs (with b-values), GREs (protocol → part → [(echo, path)]: a
    protocol with a phase or real and imaginary parts), and the rest."""
    sidecars = {path: io.read_json(path.with_name(_stem(path) + ".json")) for path in converted}
    converted = sorted(converted, key=lambda path: (sidecars[path].get("SeriesNumber", 0), path.name))
    dwis, gres, other = [], {}, []
    for path in converted:
        if path.with_name(_stem(path) + ".bval").is_file():
            dwis.append(path)
            continue
        protocol = sidecars[path].get("ProtocolName") or sidecars[path].get("SeriesDescription") or _stem(path)
        part, echo = _part(path, sidecars[path])
        gres.setdefault(protocol, {}).setdefault(part, []).append((echo, path))
    for protocol in [p for p, parts in gres.items() if "phase" not in parts and "real" not in parts]:
        other += [path for paths in gres.pop(protocol).values() for _, path in paths]
    return dwis, gres, other


def _name(subject, session, run, runs, *entities):
    parts = [subject, session, f"run-{run}" if runs > 1 else None, *entities]
    return "_".join(p for p in parts if p)


def _file_all(pairs):
    """Copy each (source, target) of `pairs`, each atomically, and return the targets written: a target already there
    with the same bytes is left as it is; if any differs, nothing is written (nothing is overwritten, and no session
    is left half imported)."""
    conflicts = [t for s, t in pairs if t.exists() and t.read_bytes() != s.read_bytes()]
    if conflicts:
        raise InputError(
            f"{', '.join(map(str, conflicts))}: exist{'s' if len(conflicts) == 1 else ''} and differ"
            f"{'s' if len(conflicts) == 1 else ''}; import into another session or remove "
            f"{'it' if len(conflicts) == 1 else 'them'} first (nothing was written)"
        )
    written = []
    for source, target in pairs:
        if not target.exists():
            with outputs.atomic_path(target) as tmp:
                shutil.copyfile(source, tmp)
            written.append(target)
    return written


def import_dicom(dicom_dir, dataset, subject, *, session=None, group=None):
    """Convert a subject's DICOM folder with dcm2niix and file it into the BIDS dataset `dataset` (made if needed),
    with a row in ``participants.tsv`` (``participant_id``, ``group``; a row already there is kept, its group set
    when given).

    Returns
    -------
    dict with ``written`` (paths) and ``left_out`` (converted series that are neither DWI nor GRE).
    """
    dicom_dir, dataset = Path(dicom_dir), Path(dataset)
    if not dicom_dir.is_dir():
        raise InputError(f"DICOM {dicom_dir}: not a folder")
    if not subject.startswith("sub-") or "_" in subject:
        raise InputError(f"subject {subject!r}: expected a BIDS label such as sub-01")
    session = None if session is None else ("ses-" + str(session).removeprefix("ses-"))
    folder = dataset / subject / (session or "")
    outputs.prepare_folder(dataset, "BIDS dataset")
    pairs = []  # (converted file, its place in the dataset)
    with tempfile.TemporaryDirectory(prefix=".alsquant-dcm2niix-", dir=dataset) as tmp:
        dwis, gres, other = _sorted_files(_convert(dicom_dir, Path(tmp)))
        if not dwis and not gres:
            raise InputError(
                f"DICOM {dicom_dir}: neither a DWI (no b-values) nor a GRE with phase or real/imaginary parts among "
                f"{', '.join(_stem(p) for p in other)}"
            )
        for run, path in enumerate(dwis, 1):
            name = _name(subject, session, run, len(dwis), "dwi")
            for suffix in (".nii.gz", ".bval", ".bvec", ".json"):
                pairs.append((path.with_name(_stem(path) + suffix), folder / "dwi" / (name + suffix)))
        for run, parts in enumerate(gres.values(), 1):
            for part, echoes in parts.items():
                for echo, path in sorted(echoes):
                    echo_entity = f"echo-{echo}" if len(echoes) > 1 else None
                    name = _name(subject, session, run, len(gres), echo_entity, f"part-{part}", "T2starw")
                    pairs.append((path, folder / "anat" / f"{name}.nii.gz"))
                    pairs.append((path.with_name(_stem(path) + ".json"), folder / "anat" / f"{name}.json"))
        written = _file_all(pairs)
    _participant(dataset, subject, group)
    for path in other:
        log.warning("%s: not a DWI nor part of a GRE with phase; left out", _stem(path))
    return {"written": written, "left_out": [_stem(p) for p in other]}


def _participant(dataset, subject, group):
    table = dataset / "participants.tsv"
    rows = io.read_table(table) if table.is_file() else []
    row = next((r for r in rows if r.get("participant_id") == subject), None)
    if row is None:
        rows.append({"participant_id": subject, "group": group or ""})
    elif group:
        row["group"] = group
    io.write_table(table, rows, list(dict.fromkeys(["participant_id", "group", *(k for r in rows for k in r)])))
