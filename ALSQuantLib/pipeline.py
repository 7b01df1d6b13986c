"""One subject's whole pipeline, and a cohort's: DWI and GRE in; DKI maps, susceptibility, atlas labels and the
study's markers out.

A subject runs in stages, each in its own folder and each the same step function as its command
(`ALSQuantLib.workflows`): ``dki`` (MK, FA, MD, mask), ``brain`` (the atlas template's brain on the GRE's grid, the
QSM's mask when none is given: `SubjectOptions.gre_brain`), ``qsm`` (susceptibility, local field, mask) and ``label``
(the atlas registered to the FA, labels in DWI and GRE space, ROI statistics). Every output is written atomically,
and each stage's provenance record (its options and the SHA-256 of its inputs) is written last: a stage whose record
matches the current options and inputs, with all its outputs present, is skipped. A killed run therefore resumes at
the first stage without a matching record, and changing an option or an input reruns exactly the stages that depend
on it.

A cohort (a BIDS-like folder with ``participants.tsv``) runs its subjects in parallel: a local process pool by
default, or a Dask distributed cluster. One subject's failure is logged and reported; the others go on.
"""

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from . import derivatives, dipole, geometry, io, outputs, report, workflows
from .atlas import LabelingOptions, atlas_for
from .dki import DKIOptions
from .errors import InputError
from .options import option
from .qsm import QSMOptions

log = logging.getLogger(__name__)

MARKERS = {"cst_mk": ("CST", "mk"), "cst_md": ("CST", "md"), "cst_fa": ("CST", "fa"), "m1_ms": ("M1", "ms")}
"""The study's markers: column → (region, map). Each is the voxel-weighted mean of the region's left and right."""

DKI_MAPS = ("mk", "fa", "md")
"""The DKI maps a subject's run writes and measures."""
STAGES = ("dki", "brain", "qsm", "label")
GRE_BRAIN_CHOICES = ("template", "magnitude")
COHORT_TABLE = "cohort.csv"
FAILURES = "failures.json"
SUBJECT_PAGE = "subject.html"
COHORT_PAGE = "index.html"


@dataclass(frozen=True)
class SubjectOptions:
    """Everything that shapes a subject's results: one options type per step (each recorded in its provenance)."""

    dki: DKIOptions = field(default_factory=DKIOptions)
    qsm: QSMOptions = field(default_factory=QSMOptions)
    labeling: LabelingOptions = field(default_factory=LabelingOptions)
    gre_brain: str = option(
        "template",
        "the QSM's brain mask when none is given: template (the atlas template's brain brought onto the GRE by "
        "the labelling's registration) or magnitude (a threshold of the GRE magnitude, which keeps the scalp and "
        "neck of a real head)",
        choices=GRE_BRAIN_CHOICES,
    )


@dataclass(frozen=True)
class SubjectInputs:
    """One subject's files. GRE magnitude and phase, or (when those are empty) its real and imaginary parts: one file
    per echo, in echo order (or one 4D file each).

    Optional masks replace the automatic ones: ``dwi_mask`` (brain, DWI grid) for DKI, ``gre_mask`` (brain, GRE grid)
    for QSM, ``tissue_mask`` (grey matter, either grid) for the cortex regions.
    """

    subject: str
    dwi: Path
    gre_magnitude: tuple
    gre_phase: tuple
    bval: Path = None
    bvec: Path = None
    echo_times: tuple = None
    field_strength: float = None
    dwi_mask: Path = None
    gre_mask: Path = None
    tissue_mask: Path = None
    gre_real: tuple = ()
    gre_imaginary: tuple = ()

    def gre_parts(self):
        """The GRE's files, checked (`io.gre_parts`): {"magnitude", "phase"} or {"real", "imaginary"} → paths."""
        return io.gre_parts(self.gre_magnitude, self.gre_phase, self.gre_real, self.gre_imaginary)

    def files(self):
        named = {"dwi": self.dwi, "bval": self.bval, "bvec": self.bvec}
        named.update(dwi_mask=self.dwi_mask, gre_mask=self.gre_mask, tissue_mask=self.tissue_mask)
        for part, paths in self.gre_parts().items():
            named.update({f"gre_{part}_{i + 1}": p for i, p in enumerate(paths)})
        return {k: Path(v) for k, v in named.items() if v is not None}


# ----------------------------------------------------------------------------------------------------------------
# Finding a subject's files
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Selection:
    """Which of a subject's acquisitions to use when a dataset holds several: a BIDS session (``ses-01`` or ``01``;
    a cohort's ROC analysis takes one measurement a subject) and the ``run-N`` of the DWI and of the GRE."""

    session: str = None
    dwi_run: str = None
    gre_run: str = None


def _entity(path, key):
    """The value of a BIDS entity (``run-2`` → "2") in a file name, or None."""
    for part in Path(path).name.split(".")[0].split("_"):
        if part.startswith(f"{key}-"):
            return part[len(key) + 1 :]
    return None


def _same_label(a, b):
    """Labels equal as BIDS means them: "01" and "1" name the same run."""
    a, b = str(a), str(b)
    return a == b or (a.isdigit() and b.isdigit() and int(a) == int(b))


def _subject_folder(dataset, subject, session):
    """The folder holding a subject's ``dwi`` and ``anat``: the subject's, or one of its sessions' (``ses-*``)."""
    folder = Path(dataset) / subject
    if not folder.is_dir():
        raise InputError(f"subject {subject}: no folder {folder}")
    sessions = sorted(p.name for p in folder.glob("ses-*") if p.is_dir())
    if session is not None:
        chosen = [s for s in sessions if _same_label(s[4:], str(session).removeprefix("ses-"))]
        if not chosen:
            raise InputError(f"subject {subject}: no session {session}; it has {', '.join(sessions) or 'none'}")
        return folder / chosen[0]
    if sessions and not (folder / "dwi").is_dir():
        if len(sessions) > 1:
            raise InputError(
                f"subject {subject}: sessions {', '.join(sessions)}; choose one with --session (a cohort's "
                "analysis takes one measurement a subject)"
            )
        return folder / sessions[0]
    return folder


def _choose_run(paths, run, what, flag):
    """`paths` of one acquisition kind narrowed to ``run-<run>``; several left is an error naming them and `flag`."""
    if run is not None:
        paths = [p for p in paths if _entity(p, "run") is not None and _same_label(_entity(p, "run"), run)]
    runs = sorted({_entity(p, "run") for p in paths}, key=str)
    if len(runs) > 1:
        names = ", ".join(p.name for p in paths)
        raise InputError(f"{what}: several runs ({names}); choose one with {flag}")
    return paths


def _echo_number(path):
    """A GRE file's echo: BIDS ``echo-N``, or dcm2niix's ``_eN``; 0 when neither."""
    echo = _entity(path, "echo")
    if echo is not None and echo.isdigit():
        return int(echo)
    for part in Path(path).name.split(".")[0].split("_"):
        if len(part) > 1 and part[0] == "e" and part[1:].isdigit():
            return int(part[1:])
    return 0


DCM2NIIX_PARTS = {"phase": "_ph", "real": "_real", "imag": "_imaginary"}
"""The suffixes dcm2niix gives a GRE's phase, real and imaginary images (the magnitude has none)."""


def _gre_files(anat, subject, run):
    """The GRE's files in `anat`, part → paths in echo order: BIDS ``part-mag/phase/real/imag``, else dcm2niix's
    names (``*_ph``, ``*_real``, ``*_imaginary``; the magnitude without a suffix; echoes ``_eN``)."""
    if not anat.is_dir():
        return {}

    def ordered(paths):
        return tuple(sorted(paths, key=_echo_number))

    what = f"subject {subject} GRE"
    bids = {
        part: _choose_run(sorted(anat.glob(f"{subject}*_part-{part}_*.nii*")), run, what, "--gre-run")
        for part in ("mag", "phase", "real", "imag")
    }
    if bids["phase"] or bids["real"]:
        return {part: ordered(paths) for part, paths in bids.items()}
    found = {}
    for part, suffix in DCM2NIIX_PARTS.items():
        found[part] = _choose_run(
            [p for p in sorted(anat.glob(f"*{suffix}.nii*")) if p.name.split(".")[0].endswith(suffix)],
            run,
            what,
            "--gre-run",
        )
    magnitudes = []
    for phase in found["phase"]:
        stem = phase.name.split(".")[0]
        magnitude = phase.with_name(stem[: -len("_ph")] + phase.name[len(stem) :])
        if not magnitude.is_file():
            raise InputError(f"{what}: phase {phase} has no magnitude {magnitude} beside it")
        magnitudes.append(magnitude)
    return {"mag": ordered(magnitudes), **{part: ordered(paths) for part, paths in found.items()}}


def find_subject(dataset, subject, selection=None):
    """A subject's DWI (with FSL bval/bvec) and GRE magnitude/phase in a BIDS-like dataset.

    ``<subject>[/ses-*]/dwi/<subject>*_dwi.nii.gz`` (or ``.nrrd``/``.nhdr``), and in ``anat`` the GRE: BIDS
    ``*_part-mag_*`` and ``*_part-phase_*`` NIfTI files, or (without a phase) ``*_part-real_*`` and ``*_part-imag_*``
    (several echoes sorted by their ``echo-N`` entity), or dcm2niix's names (`DCM2NIIX_PARTS`). A subject with
    several sessions or runs needs a `Selection`. Masks named as BIDS derivatives are used when present:
    ``dwi/<subject>*_desc-brain_mask.nii*`` (DKI), ``anat/<subject>*_desc-brain_mask.nii*`` (QSM) and
    ``anat/<subject>*_label-GM_mask.nii*`` (cortex regions).
    """
    selection = selection or Selection()
    folder = _subject_folder(dataset, subject, selection.session)
    dwi_dir = folder / "dwi"
    found = sorted(dwi_dir.glob(f"{subject}*_dwi.nii*")) if dwi_dir.is_dir() else []
    found += sorted(dwi_dir.glob(f"{subject}*_dwi.nrrd")) + sorted(dwi_dir.glob(f"{subject}*_dwi.nhdr"))
    found = _choose_run(found, selection.dwi_run, f"subject {subject} DWI", "--dwi-run")
    if len(found) != 1:
        raise InputError(
            f"subject {subject} DWI: expected one file {dwi_dir / (subject + '*_dwi.nii.gz')} (or .nrrd), found "
            f"{len(found)}"
        )
    dwi, bval, bvec = found[0], None, None
    if not dwi.name.endswith(io.NRRD_SUFFIXES):
        stem = io.strip_image_suffix(dwi)
        bval, bvec = stem.with_suffix(".bval"), stem.with_suffix(".bvec")
    anat = folder / "anat"
    gre = _gre_files(anat, subject, selection.gre_run)
    polar = gre.get("phase", ())
    if not polar and not gre.get("real"):
        raise InputError(
            f"subject {subject} GRE: no {anat}/{subject}*_part-phase_*.nii.gz (with part-mag), nor part-real and "
            "part-imag files, nor dcm2niix's *_ph.nii.gz (with the magnitude)"
        )

    def optional(sub, pattern, what):
        found = sorted((folder / sub).glob(pattern)) if (folder / sub).is_dir() else []
        if len(found) > 1:
            raise InputError(f"subject {subject} {what}: several files {folder / sub / pattern}; expected one")
        return found[0] if found else None

    return SubjectInputs(
        subject,
        dwi,
        gre["mag"] if polar else (),
        polar,
        bval,
        bvec,
        dwi_mask=optional("dwi", f"{subject}*_desc-brain_mask.nii*", "DWI brain mask"),
        gre_mask=optional("anat", f"{subject}*_desc-brain_mask.nii*", "GRE brain mask"),
        tissue_mask=optional("anat", f"{subject}*_label-GM_mask.nii*", "grey-matter mask"),
        gre_real=() if polar else gre["real"],
        gre_imaginary=() if polar else gre["imag"],
    )


# ----------------------------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------------------------
def markers_from_rows(rows):
    """The study's markers (`MARKERS`) from ROI statistics rows: each region's left and right means, weighted by
    their voxel counts; DKI maps in DWI space, susceptibility in GRE space."""
    out = {}
    for column, (region, name) in MARKERS.items():
        space = "gre" if name == "ms" else "reference"
        chosen = [
            r for r in rows if r["region"] == region and r["map"] == name and r["space"] == space and int(r["n"]) > 0
        ]
        n = sum(int(r["n"]) for r in chosen)
        out[column] = sum(float(r["mean"]) * int(r["n"]) for r in chosen) / n if n else float("nan")
    return out


def check_subject(inputs, options):
    """Everything about a subject's inputs that can be checked in a second, before minutes of computing: every file
    there and readable, the DWI's gradient files one entry per volume, the GRE's magnitude and phase on one grid, the
    atlas and its regions found."""
    files = inputs.files()
    for name, path in files.items():
        if not path.is_file():
            raise InputError(f"subject {inputs.subject}: input {name} {path}: file not found")
    dwi_grid = io.image_grid(inputs.dwi, "DWI")
    if not inputs.dwi.name.endswith(io.NRRD_SUFFIXES):
        shape, affine = dwi_grid
        if len(shape) != 4:
            raise InputError(f"DWI {inputs.dwi}: expected a 4D image (volumes along the 4th axis), got shape {shape}")
        stem = io.strip_image_suffix(inputs.dwi)
        bval, bvec = inputs.bval or stem.with_suffix(".bval"), inputs.bvec or stem.with_suffix(".bvec")
        bvals, _ = io.read_fsl_gradients(bval, bvec, affine)
        if bvals.size != shape[3]:
            raise InputError(
                f"DWI {inputs.dwi} has {shape[3]} volumes but {bval} lists {bvals.size} b-values; "
                "expected one per volume"
            )
    gre_files = [path for paths in inputs.gre_parts().values() for path in paths]
    first = {"first GRE image": io.image_grid(gre_files[0], "GRE image")}
    for path in gre_files:
        geometry.require_grid(f"GRE image {path}", io.image_grid(path, "GRE image"), first)
    grids = {"DWI": dwi_grid, "GRE": first["first GRE image"]}
    for what, path, allowed in (
        ("DWI brain mask", inputs.dwi_mask, ("DWI",)),
        ("GRE brain mask", inputs.gre_mask, ("GRE",)),
        ("grey-matter mask", inputs.tissue_mask, ("DWI", "GRE")),
    ):
        if path is not None:
            geometry.require_grid(f"{what} {path}", io.image_grid(path, what), {n: grids[n] for n in allowed})
    atlas = atlas_for(options.labeling)
    for roi in options.labeling.rois:
        atlas.region(roi)


def run_subject(inputs, out_dir, options=None, *, group="", bids_root=None, dataset=None):
    """Run DKI, the template's brain on the GRE (with ``options.gre_brain`` "template" and no GRE mask), QSM and
    labelling for one subject into `out_dir` (`ALSQuantLib.workflows`; current stages are skipped), then write
    ``markers.json`` (only when its content changes), the subject's page, and the results under BIDS-derivative
    names in the derivative dataset `bids_root` (default `out_dir`; `ALSQuantLib.derivatives`), whose source is
    `dataset` when given.

    The inputs are checked first (`check_subject`), and `out_dir` is locked for the run: a second run on the same
    folder is refused while this one holds it.

    Parameters
    ----------
    inputs : SubjectInputs
    out_dir : path
    options : SubjectOptions, optional

    Returns
    -------
    dict
        ``participant_id``, ``group``, the `MARKERS` columns, ``qc_passed`` and ``stages_run``.
    """
    options = options or SubjectOptions()
    out_dir = Path(out_dir)
    stage_dirs = [(out_dir / stage).resolve() for stage in STAGES]
    for path in inputs.files().values():
        if any(folder in path.resolve().parents for folder in stage_dirs):
            raise InputError(
                f"subject {inputs.subject}: input {path} lies in an output folder of {out_dir}; choose another"
            )
    check_subject(inputs, options)
    with outputs.locked(out_dir, f"subject {inputs.subject} output folder"):
        result = _run_stages(inputs, out_dir, options, group)
        root = Path(bids_root or out_dir)
        derivatives.write_description(root, dataset)
        session = _entity(inputs.dwi, "ses")
        derivatives.export_subject(out_dir, root, inputs.subject, session, list(inputs.files().values()))
        return result


def _run_stages(inputs, out_dir, options, group):
    dki_result = workflows.dki_step(
        inputs.dwi,
        out_dir / "dki",
        options.dki,
        bval=inputs.bval,
        bvec=inputs.bvec,
        mask=inputs.dwi_mask,
        maps=DKI_MAPS,
    )
    gre_mask, brain_result = inputs.gre_mask, None
    if gre_mask is None and options.gre_brain == "template":
        brain_result = workflows.brain_step(
            out_dir / "dki" / "fa.nii.gz",
            out_dir / "brain",
            options.labeling,
            magnitude=inputs.gre_magnitude[0] if inputs.gre_magnitude else None,
            real=inputs.gre_real[0] if inputs.gre_real else None,
            imaginary=inputs.gre_imaginary[0] if inputs.gre_imaginary else None,
        )
        gre_mask = out_dir / "brain" / "brain_gre.nii.gz"
    qsm_result = workflows.qsm_step(
        inputs.gre_magnitude,
        inputs.gre_phase,
        out_dir / "qsm",
        options.qsm,
        real=inputs.gre_real,
        imaginary=inputs.gre_imaginary,
        echo_times=inputs.echo_times,
        field_strength=inputs.field_strength,
        mask=gre_mask,
    )
    dki_dir, qsm_dir = out_dir / "dki", out_dir / "qsm"
    maps = {name: dki_dir / f"{name}.nii.gz" for name in DKI_MAPS if (dki_dir / f"{name}.nii.gz").exists()}
    maps["ms"] = qsm_dir / "susceptibility.nii.gz"
    masks = {name: (qsm_dir if name == "ms" else dki_dir) / "mask.nii.gz" for name in maps}
    label_result = workflows.label_step(
        dki_dir / "fa.nii.gz",
        out_dir / "label",
        options.labeling,
        maps=maps,
        map_masks=masks,
        gre_magnitude=inputs.gre_magnitude[0] if inputs.gre_magnitude else qsm_dir / "magnitude.nii.gz",
        tissue_mask=inputs.tissue_mask,
        subject=inputs.subject,
        # the brain stage's registrations, made with the same FA, GRE and options: one registration a subject
        registrations=out_dir / "brain" / workflows.REGISTRATION_RECORD if brain_result else None,
    )
    rows = io.read_table(out_dir / "label" / "roi_stats.csv")
    quality = io.read_json(out_dir / "label" / "quality.json")
    result = {
        "participant_id": inputs.subject,
        "group": group,
        **markers_from_rows(rows),
        "qc_passed": bool(quality["passed"]),
    }
    markers_path = out_dir / "markers.json"
    try:
        unchanged = markers_path.is_file() and io.read_json(markers_path) == io.json_ready(result)
    except InputError:
        unchanged = False
    if not unchanged:  # a finished subject is not rewritten: a rerun on a full disk still succeeds
        io.write_json(markers_path, result)
    pictures = [
        out_dir / "label" / workflows.LABEL_PICTURE,
        out_dir / "label" / workflows.MAPS_PICTURE,
        out_dir / "dki" / workflows.MOTION_PICTURE,
    ]
    report.subject_page(out_dir / SUBJECT_PAGE, result, quality, pictures)
    ran = [r.step for r in (dki_result, brain_result, qsm_result, label_result) if r is not None and r.ran]
    return {**result, "stages_run": ran}


# ----------------------------------------------------------------------------------------------------------------
# Cohorts
# ----------------------------------------------------------------------------------------------------------------
def read_participants(dataset):
    """(participant_id, group) pairs from ``participants.tsv``."""
    path = Path(dataset) / "participants.tsv"
    rows = io.read_table(path)
    if not rows or "participant_id" not in rows[0]:
        raise InputError(f"{path}: expected a table with a participant_id column (and group)")
    return [(r["participant_id"], r.get("group", "")) for r in rows]


class _SubjectLog(logging.FileHandler):
    """A subject's log file. If it cannot be written (a full disk), one line on stderr says so and logging to it
    stops, instead of a traceback for every message."""

    failed = False

    def emit(self, record):
        if not self.failed:
            super().emit(record)

    def close(self):
        try:
            super().close()
        except OSError:  # flushing what could not be written: already reported
            pass

    def handleError(self, record):
        if not self.failed:
            self.failed = True
            error = sys.exc_info()[1]
            reason = outputs.os_error(error, self.baseFilename) if isinstance(error, OSError) else error
            sys.stderr.write(f"log {self.baseFilename} cannot be written ({reason}); logging to it stops\n")


def _subject_job(dataset, subject, group, out_dir, options, threads, selection=None):
    """Run one subject in a worker; log to ``logs/<subject>.log``; return (subject, result or None, error or None)."""
    if threads:
        os.environ["ALSQUANT_THREADS"] = str(threads)
    log_path = Path(out_dir) / "logs" / f"{subject}.log"
    package_log = logging.getLogger("ALSQuantLib")
    package_log.setLevel(logging.INFO)
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        handler = _SubjectLog(log_path)
    except OSError as err:
        handler = logging.NullHandler()
        sys.stderr.write(f"log {log_path} cannot be written ({outputs.os_error(err, log_path)})\n")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    package_log.addHandler(handler)
    propagate, package_log.propagate = package_log.propagate, False  # the details go to the log, not the console
    try:
        log.info("%s (%s): start", subject, group)
        inputs = find_subject(dataset, subject, selection)
        subject_dir = Path(out_dir) / "subjects" / subject
        result = run_subject(inputs, subject_dir, options, group=group, bids_root=out_dir, dataset=dataset)
        log.info("%s: finished; stages run: %s", subject, ", ".join(result["stages_run"]) or "none")
        return subject, result, None
    except Exception as error:  # one subject's failure must not stop the cohort: it is logged and reported
        log.error("%s: failed\n%s", subject, traceback.format_exc())
        return subject, None, f"{type(error).__name__}: {error}"
    finally:
        package_log.removeHandler(handler)
        package_log.propagate = propagate
        handler.close()


def _die_with_parent():
    """Make this worker process end when its parent does, however the parent ends (SIGKILL included), so that no
    orphan goes on writing into folders a rerun writes too: Linux's parent-death signal, and elsewhere a thread
    that waits on the parent's sentinel."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent.pid:  # the parent died before the call
            os._exit(1)
        return

    def watch():
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="alsquant-parent-watch", daemon=True).start()


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def interrupt_on_sigterm():
    """Make SIGTERM stop this process as Ctrl-C does (`KeyboardInterrupt`), so that it unwinds: workers are stopped,
    temporaries removed, locks released. Only from the main thread (where Python runs signal handlers)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupt)


def _worker(connection):
    """A worker process: run the subjects the parent sends, one at a time, until it sends None."""
    _die_with_parent()
    interrupt_on_sigterm()  # the parent's terminate() unwinds the subject's step, leaving no temporaries
    try:
        while (job := connection.recv()) is not None:
            connection.send(_subject_job(*job))
    except KeyboardInterrupt:  # stopped by the parent (or Ctrl-C): the parent reports it
        sys.exit(130)


def _run_in_processes(jobs, workers, collect):
    """The subjects in `workers` spawned processes, each taking the next subject when it has finished one.

    The parent knows which subject each process is on, so a process that dies (killed, out of memory) fails only
    that subject, and a new process takes over the rest (a process pool would break and fail every pending one).
    If the parent is interrupted (Ctrl-C, SIGTERM: `KeyboardInterrupt`), it stops its workers before it returns;
    if it is killed, they die with it (`_die_with_parent`).
    """
    context = multiprocessing.get_context("spawn")  # a clean interpreter: no inherited threads or ITK state
    pending, busy = list(jobs), {}  # busy: parent's end of the pipe → (process, subject)

    def start_worker():
        connection, child = context.Pipe()
        process = context.Process(target=_worker, args=(child,), name="alsquant-worker", daemon=True)
        process.start()
        child.close()
        return connection, process

    def hand_out(connection, process):
        if pending:
            job = pending.pop(0)
            connection.send(job)
            busy[connection] = (process, job[1])
        else:
            connection.send(None)
            connection.close()
            process.join()

    try:
        for _ in range(min(workers, len(pending))):
            hand_out(*start_worker())
        while busy:
            for connection in multiprocessing.connection.wait(list(busy)):
                process, subject = busy.pop(connection)
                try:
                    message = connection.recv()
                except (EOFError, ConnectionError):  # the process died on this subject (a reset pipe, too)
                    connection.close()
                    process.join()
                    collect(subject, None, f"worker process died (exit code {process.exitcode})")
                    if pending:
                        hand_out(*start_worker())
                    continue
                collect(*message)
                hand_out(connection, process)
    finally:
        for process, _ in busy.values():
            process.terminate()
        for process, _ in busy.values():
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()


@dataclass
class CohortResult:
    rows: list
    failures: dict
    table: Path


def _bar(done, total, width=30):
    filled = int(width * done / max(total, 1))
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}"


def run_cohort(
    dataset, out_dir, options=None, *, workers=None, scheduler=None, subjects=None, selection=None, echo=print
):
    """Every subject of `dataset`, in parallel; the cohort table ``cohort.csv`` (for `stats.read_cohort`) at the end.

    Parameters
    ----------
    workers : int, optional
        Local processes (default: the cores available). Each gets an equal share of the cores for its FFTs.
    scheduler : str, optional
        Address of a Dask distributed scheduler (``tcp://host:8786``): the subjects run on its workers instead.
    subjects : sequence of str, optional
        Only these participants.
    selection : Selection, optional
        The session and runs to use where subjects have several.
    echo : callable(str)
        Progress lines (a bar per finished subject).

    Local processes are spawned: a script calling this with more than one worker needs the usual
    ``if __name__ == "__main__":`` guard. The output folder is locked for the run (a second run on it is refused);
    the workers die with this process, and an interrupt (`KeyboardInterrupt`) stops them before it propagates.

    Returns
    -------
    CohortResult
        Rows of the finished subjects (in participants order) and ``failures`` (subject → error).
    """
    dataset, out_dir = Path(dataset), Path(out_dir)
    if not dataset.is_dir():
        raise InputError(f"dataset {dataset}: not a folder")
    if out_dir.resolve() == dataset.resolve():
        raise InputError(
            f"output folder {out_dir}: it is the dataset itself; choose another (e.g. derivatives/alsquant)"
        )
    participants = read_participants(dataset)
    if subjects:
        unknown = sorted(set(subjects) - {p for p, _ in participants})
        if unknown:
            raise InputError(f"subjects {', '.join(unknown)}: not in {dataset / 'participants.tsv'}")
        participants = [(p, g) for p, g in participants if p in subjects]
    options = options or SubjectOptions()
    atlas = atlas_for(options.labeling)  # the atlas and its regions, before any subject starts
    for roi in options.labeling.rois:
        atlas.region(roi)
    with outputs.locked(out_dir, "cohort output folder"):
        return _run_cohort(dataset, out_dir, options, participants, workers, scheduler, selection, echo)


def _run_cohort(dataset, out_dir, options, participants, workers, scheduler, selection, echo):
    cores = dipole.fft_workers()
    workers = max(1, min(workers or cores, len(participants)))
    threads = max(1, cores // workers)
    echo(
        f"{len(participants)} subjects, "
        f"{'Dask scheduler ' + scheduler if scheduler else f'{workers} local processes'}; logs in {out_dir / 'logs'}"
    )
    results, failures = {}, {}
    start = time.perf_counter()

    def collect(subject, result, error):
        if error:
            failures[subject] = error
        else:
            results[subject] = result
        done = len(results) + len(failures)
        status = f"FAILED ({error})" if error else ("done" if result["stages_run"] else "already done")
        echo(f"{_bar(done, len(participants))} {subject} {status} ({time.perf_counter() - start:.0f} s)")

    jobs = [
        (str(dataset), subject, group, str(out_dir), options, threads, selection) for subject, group in participants
    ]
    if scheduler:
        from dask.distributed import Client, as_completed

        with Client(scheduler) as client:
            pending = [client.submit(_subject_job, *job, key=f"alsquant-{job[1]}", pure=False) for job in jobs]
            for future in as_completed(pending):
                collect(*future.result())
    elif workers == 1:
        for job in jobs:
            collect(*_subject_job(*job))
    else:
        _run_in_processes(jobs, workers, collect)
    rows = [{k: v for k, v in results[s].items() if k != "stages_run"} for s, _ in participants if s in results]
    table = out_dir / COHORT_TABLE
    # Replaced atomically, even when empty: a table from an earlier run must not pass for this one's.
    io.write_table(table, rows, ["participant_id", "group", *MARKERS, "qc_passed"])
    io.write_json(out_dir / FAILURES, failures)
    pages = {row["participant_id"]: f"subjects/{row['participant_id']}/{SUBJECT_PAGE}" for row in rows}
    report.cohort_page(out_dir / COHORT_PAGE, rows, failures, pages)
    echo(f"{len(rows)} subjects measured, {len(failures)} failed; cohort table {table}")
    for subject, error in failures.items():
        echo(f"  {subject}: {error} (log: {out_dir / 'logs' / (subject + '.log')})")
    return CohortResult(rows, failures, table)
