"""The ``alsquant`` command line."""

import argparse
import logging
import sys
from pathlib import Path

from . import __version__, options, outputs, pipeline
from .atlas.labeling import LabelingOptions
from .dki import DKI_MAPS, DKIOptions
from .errors import InputError
from .qsm import QSMOptions
from .stats import PENALTIES, QC_COLUMN, SUBJECT_COLUMN

log = logging.getLogger("alsquant")


def _print_progress(fraction, message):
    print(f"[{fraction * 100:5.1f}%] {message}", flush=True)


def _print_warnings(step):
    for warning in step.record["results"].get("warnings", []):
        print(f"warning: {warning}")


# ----------------------------------------------------------------------------------------------------------------
# simulate
# ----------------------------------------------------------------------------------------------------------------
def _add_import(subparsers):
    p = subparsers.add_parser("import", help="a subject's DICOM folder converted (dcm2niix) into a BIDS dataset")
    p.add_argument("dicom", type=Path, help="folder holding the subject's DICOM files (searched recursively)")
    p.add_argument("--out", type=Path, required=True, help="the BIDS dataset (made if needed)")
    p.add_argument("--subject", required=True, help="BIDS label, e.g. sub-01")
    p.add_argument("--session", help="BIDS session, e.g. ses-01 (longitudinal studies)")
    p.add_argument("--group", help="the subject's group for participants.tsv (e.g. ALS, control)")
    p.set_defaults(run=_run_import)


def _run_import(args):
    from . import dicom

    logging.getLogger("ALSQuantLib").setLevel(logging.INFO)
    result = dicom.import_dicom(args.dicom, args.out, args.subject, session=args.session, group=args.group)
    for path in result["written"]:
        print(f"wrote {path}")
    for name in result["left_out"]:
        print(f"left out: {name} (neither a DWI nor a GRE with phase)")
    print(f"next: alsquant run-cohort {args.out} --out {args.out / 'derivatives' / 'alsquant'}")
    return 0


def _add_simulate(subparsers):
    p = subparsers.add_parser("simulate", help="simulate an ALS/control cohort as a BIDS-like dataset")
    p.add_argument("--subjects", type=int, default=10, help="number of subjects (default 10)")
    p.add_argument("--out", required=True, type=Path, help="output folder (new or empty)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--als-fraction", type=float, default=0.5, help="fraction of ALS subjects (default 0.5)")
    p.add_argument("--snr", type=float, default=None, help="DWI SNR: white-matter b0 / noise SD (default 30)")
    p.add_argument("--gre-snr", type=float, default=None, help="GRE SNR at the first echo (default 40)")
    p.add_argument(
        "--echo-times", type=float, nargs="+", default=None, help="GRE echo times in seconds (default 0.015)"
    )
    p.add_argument("--gre-tilt", type=float, default=None, help="GRE slice obliquity in degrees (default 0)")
    p.add_argument(
        "--gre-bias",
        type=float,
        default=None,
        help="receive-coil intensity profile over the GRE magnitude (default 0: none; 0.6: the head's edge about 1.8x "
        "as bright as its centre)",
    )
    p.add_argument(
        "--resolution",
        choices=("small", "study"),
        default="small",
        help="small grids for tests (default) or the study's (DWI 256x256x28, GRE 512x512x50)",
    )
    p.add_argument(
        "--anatomy",
        choices=("phantom", "mni152"),
        default="phantom",
        help="template anatomy: the analytic phantom (default) or real anatomy (MNI152 tissue from nilearn, CST and M1 "
        "from JHU tracts and Harvard-Oxford: needs --fsldir or --atlas-dir)",
    )
    p.add_argument("--fsldir", type=Path, help="FSL installation holding the JHU and Harvard-Oxford atlases")
    p.add_argument("--atlas-dir", type=Path, help="folder holding the JHU tracts and Harvard-Oxford files")
    p.add_argument(
        "--eve-dir", type=Path, help="JHU Eve's folder: real anatomy gets deep grey matter from its globus pallidus"
    )
    p.add_argument(
        "--dwi-slab",
        action="store_true",
        help="the study's partial DWI coverage: 28 axial slices of 3 mm, centred 10 mm above the brain's centre",
    )
    p.set_defaults(run=_run_simulate)


def _phantom_config(args):
    from . import phantom

    base = phantom.PhantomConfig.study() if args.resolution == "study" else phantom.PhantomConfig()
    echo_times = tuple(args.echo_times) if args.echo_times else None
    return phantom.with_overrides(
        base,
        snr_dwi=args.snr,
        snr_gre=args.gre_snr,
        echo_times=echo_times,
        gre_tilt_deg=args.gre_tilt,
        gre_receive_bias=args.gre_bias,
    )


def _run_simulate(args):
    from . import phantom

    config, anatomy = _phantom_config(args), phantom.AnalyticAnatomy
    if args.anatomy == "mni152":
        from . import anatomy as real

        fsldir, atlas_dir, eve_dir = (str(p) if p else None for p in (args.fsldir, args.atlas_dir, args.eve_dir))
        anatomy = real.real_anatomy(fsldir, atlas_dir, eve_dir=eve_dir)
        config = real.anatomy_config(config)
    if args.dwi_slab:
        config = phantom.with_dwi_slab(config)
    rows = phantom.simulate_cohort(
        args.out,
        args.subjects,
        seed=args.seed,
        als_fraction=args.als_fraction,
        config=config,
        anatomy=anatomy,
        progress=_print_progress,
    )
    n_als = sum(row["group"] == "ALS" for row in rows)
    print(f"{len(rows)} subjects ({n_als} ALS, {len(rows) - n_als} control) in {args.out}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# demo
# ----------------------------------------------------------------------------------------------------------------
def _add_demo(subparsers):
    p = subparsers.add_parser("demo", help="simulate a cohort and run every pipeline stage that exists on it")
    p.add_argument("--out", type=Path, default=Path("alsquant-demo"), help="output folder (default ./alsquant-demo)")
    p.add_argument("--als", type=int, default=20, help="ALS subjects (default 20)")
    p.add_argument("--controls", type=int, default=15, help="control subjects (default 15)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, help="subjects processed in parallel (default: the cores available)")
    p.set_defaults(run=_run_demo)


def _run_demo(args):
    from . import demo

    return demo.run(
        args.out,
        n_als=args.als,
        n_controls=args.controls,
        seed=args.seed,
        workers=args.workers,
        progress=_print_progress,
    )


# ----------------------------------------------------------------------------------------------------------------
# dki, qsm, label: one step each (ALSQuantLib.workflows), options from their dataclasses
# ----------------------------------------------------------------------------------------------------------------
def _add_dki(subparsers):
    p = subparsers.add_parser("dki", help="fit DKI/DTI to a DWI series and write MK, FA, MD and other maps")
    p.add_argument("dwi", type=Path, help="DWI as NIfTI (with FSL bval/bvec) or NRRD")
    p.add_argument("--bval", type=Path, help="FSL b-values (default: beside the DWI, same stem)")
    p.add_argument("--bvec", type=Path, help="FSL b-vectors (default: beside the DWI, same stem)")
    p.add_argument("--mask", type=Path, help="brain mask (default: median Otsu on the mean b0)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument(
        "--maps", default=",".join(DKI_MAPS), help=f"comma-separated maps to write (default: {','.join(DKI_MAPS)})"
    )
    options.add_arguments(p, DKIOptions)
    p.set_defaults(run=_run_dki)


def _run_dki(args):
    from . import workflows

    maps = [m for m in (m.strip() for m in args.maps.split(",")) if m]
    step = workflows.dki_step(
        args.dwi,
        args.out,
        options.from_arguments(DKIOptions, args),
        bval=args.bval,
        bvec=args.bvec,
        mask=args.mask,
        maps=maps,
        progress=_print_progress,
    )
    results = step.record["results"]
    _print_warnings(step)
    if results["not_available"]:
        print(f"not available from a DTI-only fit, not written: {', '.join(results['not_available'])}")
    print(
        f"wrote {', '.join(results['maps'])} and mask to {args.out} ({results['mask_voxels']} voxels, "
        f"{results['invalid_signals']} invalid signals masked, {results['failed_voxels']} voxels failed)"
    )
    return 0


def _add_qsm(subparsers):
    p = subparsers.add_parser(
        "qsm", help="reconstruct susceptibility (ppm) from GRE magnitude and phase, or real and imaginary parts"
    )
    p.add_argument("--magnitude", type=Path, nargs="+", help="magnitude: one 4D file or one per echo")
    p.add_argument("--phase", type=Path, nargs="+", help="phase: one 4D file or one per echo")
    p.add_argument("--real", type=Path, nargs="+", help="real part, instead of magnitude and phase: as they are")
    p.add_argument("--imaginary", type=Path, nargs="+", help="imaginary part, with --real")
    p.add_argument("--te", type=float, nargs="+", help="echo times in seconds (default: EchoTime from the sidecars)")
    p.add_argument("--b0", type=float, help="field strength in tesla (default: MagneticFieldStrength from the sidecar)")
    p.add_argument("--mask", type=Path, help="brain mask (default: from the magnitude, eroded)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    options.add_arguments(p, QSMOptions)
    p.set_defaults(run=_run_qsm)


def _run_qsm(args):
    from . import workflows

    step = workflows.qsm_step(
        args.magnitude,
        args.phase,
        args.out,
        options.from_arguments(QSMOptions, args),
        real=args.real,
        imaginary=args.imaginary,
        echo_times=args.te,
        field_strength=args.b0,
        mask=args.mask,
        progress=_print_progress,
    )
    _print_warnings(step)
    results = step.record["results"]
    print(
        f"wrote susceptibility (ppm, relative to {results['reference']}), local field (ppm) and mask to {args.out}; "
        f"phase: {results['phase_scaling']}, sign {results['phase_sign']}, chopping {results['chopping']}"
    )
    return 0


def _add_label(subparsers):
    p = subparsers.add_parser("label", help="bring atlas regions into the subject's space with ANTs and measure maps")
    p.add_argument("--reference", type=Path, required=True, help="subject reference image: FA (or b0) in DWI space")
    p.add_argument("--gre-magnitude", type=Path, help="GRE magnitude, rigidly linked to the reference")
    p.add_argument("--maps", default="", help="name=file pairs, e.g. mk=mk.nii.gz,fa=fa.nii.gz,ms=chi.nii.gz")
    p.add_argument(
        "--tissue-mask",
        type=Path,
        help="grey-matter mask (on the reference's or the GRE's grid): cortex regions keep only its voxels "
        "(default: the grey matter segmented from --gre-magnitude)",
    )
    p.add_argument(
        "--keep-transforms", action="store_true", help="keep the ANTs transforms (subject -> atlas) in OUT/transforms"
    )
    p.add_argument("--subject", default="", help="subject identifier for the table")
    p.add_argument("--out", type=Path, required=True)
    options.add_arguments(p, LabelingOptions)
    p.set_defaults(run=_run_label)


def _parse_maps(text):
    maps = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise InputError(f"--maps: expected name=file pairs separated by commas, got {item!r}")
        maps[name.strip().lower()] = Path(path.strip())
    return maps


def _run_label(args):
    from . import workflows

    step = workflows.label_step(
        args.reference,
        args.out,
        options.from_arguments(LabelingOptions, args),
        maps=_parse_maps(args.maps),
        gre_magnitude=args.gre_magnitude,
        tissue_mask=args.tissue_mask,
        subject=args.subject,
        keep_transforms=args.keep_transforms,
        progress=_print_progress,
    )
    for flag in step.record["results"]["flags"]:
        print(f"quality warning: {flag}")
    print(f"wrote labels, roi_stats.csv and quality.json to {args.out}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# roc and classify
# ----------------------------------------------------------------------------------------------------------------
def _add_roc(subparsers):
    p = subparsers.add_parser("roc", help="group statistics, ROC curves and a diagnostic model from a cohort table")
    p.add_argument("cohort", type=Path, help="cohort table (CSV or TSV): subject, group and marker columns")
    p.add_argument("--group-column", default="group")
    p.add_argument("--positive", default="ALS", help="label of the positive group (default ALS)")
    p.add_argument(
        "--groups",
        type=lambda text: [g.strip() for g in text.split(",") if g.strip()],
        help="the two groups to compare, e.g. ALS,control (default: the table's, which must be two)",
    )
    p.add_argument("--subject-column", default=SUBJECT_COLUMN, help=f"(default {SUBJECT_COLUMN}, as run-cohort writes)")
    p.add_argument(
        "--exclude-failed-qc",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"leave out subjects whose {QC_COLUMN} column says the quality check failed (default: yes; said how many)",
    )
    p.add_argument("--markers", nargs="+", required=True, help="marker columns")
    p.add_argument(
        "--covariates",
        nargs="+",
        default=[],
        help="also adjust the markers for these columns (e.g. age sex), fitted in the controls; the saved model is "
        "then adjusted too, and classify needs them",
    )
    p.add_argument("--combine", nargs="*", default=[], help="combinations such as mk+ms")
    p.add_argument("--bootstrap", type=int, default=0, help="stratified bootstrap resamples for an extra AUC CI")
    p.add_argument(
        "--penalty",
        choices=PENALTIES,
        default="none",
        help="combined markers and the saved model: 'none', maximum likelihood as R's glm (default); 'l2', "
        "L2-penalised (C = 1 on standardised markers), finite when the groups are separated",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--save-model", type=Path, help="save a diagnostic model (JSON) of the first combination, else of all markers"
    )
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(run=_run_roc)


def _run_roc(args):
    from . import provenance, report, stats

    cohort = stats.read_cohort(
        args.cohort,
        markers=args.markers,
        group_column=args.group_column,
        positive=args.positive,
        subject_column=args.subject_column,
        groups=args.groups,
        exclude_failed_qc=args.exclude_failed_qc,
        covariates=args.covariates,
    )
    left_out = stats.excluded_text(cohort)
    if left_out:
        print(f"left out: {left_out}")
    results, rocs, comparison = stats.analyze(
        cohort, args.combine, penalty=args.penalty, bootstrap=args.bootstrap, random_seed=args.seed
    )
    model_markers = args.combine[0].split("+") if args.combine else args.markers
    model = None
    if args.save_model:
        model = stats.diagnostic_model(cohort, model_markers, penalty=args.penalty, adjust=bool(args.covariates))
    run = {
        "cohort": str(args.cohort.resolve()),
        "cohort_sha256": provenance.file_sha256(args.cohort),
        **{k: getattr(args, k) for k in ("markers", "combine", "groups", "positive", "covariates", "penalty")},
        **{k: getattr(args, k) for k in ("exclude_failed_qc", "bootstrap", "seed")},
    }
    page = report.write_roc_outputs(args.out, cohort, results, rocs, comparison, run)
    for marker, r in results["markers"].items():
        print(
            f"{marker}: {stats.auc_text(r, 3)}, sensitivity {r['sensitivity']:.2f}, specificity {r['specificity']:.2f}"
        )
    for combination, r in results["combinations"].items():
        separated = " (groups separated: no finite maximum-likelihood fit; see --penalty l2)" if r["separated"] else ""
        print(f"{combination}: {stats.auc_text(r, 3)}{separated}")
    adjusted = results.get("adjusted", {})
    for name, r in {**adjusted.get("markers", {}), **adjusted.get("combinations", {})}.items():
        print(f"{name} adjusted for {', '.join(adjusted['covariates'])}: {stats.auc_text(r, 3)}")
    if model:
        stats.save_model(model, args.save_model)
        print(f"model of {'+'.join(model_markers)} saved to {args.save_model}")
    print(f"report: {page}")
    return 0


def _add_classify(subparsers):
    p = subparsers.add_parser("classify", help="diagnose subjects with a saved model")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("subjects", type=Path, help="table (CSV/TSV) with the model's marker columns, one subject per row")
    p.add_argument("--subject-column", default=SUBJECT_COLUMN, help=f"(default {SUBJECT_COLUMN}, as run-cohort writes)")
    p.add_argument("--out", type=Path, help="write the results here (CSV); default: beside the table, *_diagnosis.csv")
    p.set_defaults(run=_run_classify)


def _run_classify(args):
    from . import io, report, stats

    model = stats.load_model(args.model)
    covariates = model.get("adjustment", {}).get("covariates", [])
    rows, table = [], io.read_table(args.subjects)
    if table and args.subject_column not in table[0]:
        raise InputError(
            f"{args.subjects}: no subject column {args.subject_column!r}; columns are {', '.join(table[0])} "
            "(name one with --subject-column)"
        )
    for row in table:
        subject = row[args.subject_column]
        try:
            values = {m: float(row[m]) for m in model["markers"] if row.get(m, "") != ""}
            values.update({c: row[c] for c in covariates if row.get(c, "") != ""})
        except ValueError:
            raise InputError(f"{args.subjects}: subject {subject} has a non-numeric marker value") from None
        result = stats.classify(model, values)
        rows.append(
            {
                SUBJECT_COLUMN: subject,
                "probability": result["probability"],
                "decision": result["decision"],
                **{f"z_{m}": z for m, z in result["z_scores"].items()},
                "out_of_range": " ".join(result["out_of_range"]),
            }
        )
        flag = f" (outside the training range: {', '.join(result['out_of_range'])})" if result["out_of_range"] else ""
        zs = ", ".join(f"z({m}) {z:+.2f}" for m, z in result["z_scores"].items())
        print(f"{subject}: P({model['positive']}) = {result['probability']:.3f} -> {result['decision']}; {zs}{flag}")
    out = args.out or args.subjects.with_name(args.subjects.stem + "_diagnosis.csv")
    if out.resolve() in (args.subjects.resolve(), args.model.resolve()):
        raise InputError(f"output {out} would overwrite an input; choose another --out")
    io.write_table(out, rows)
    print(f"written to {out}")
    print(report.RESEARCH_USE)
    return 0


# ----------------------------------------------------------------------------------------------------------------
# run-subject, run-cohort
# ----------------------------------------------------------------------------------------------------------------
def _add_pipeline_options(p):
    p.add_argument("--out", type=Path, required=True, help="output folder")
    options.add_arguments(p, pipeline.SubjectOptions)


def _add_run_subject(subparsers):
    p = subparsers.add_parser("run-subject", help="one subject: DKI maps, QSM, atlas labels and ROI values")
    p.add_argument("--dwi", type=Path, required=True, help="DWI as NIfTI (with FSL bval/bvec beside it) or NRRD")
    p.add_argument("--bval", type=Path)
    p.add_argument("--bvec", type=Path)
    p.add_argument("--gre-magnitude", type=Path, nargs="+", default=(), help="one 4D file or one per echo")
    p.add_argument("--gre-phase", type=Path, nargs="+", default=(), help="one 4D file or one per echo")
    p.add_argument("--gre-real", type=Path, nargs="+", default=(), help="instead of magnitude and phase: real part")
    p.add_argument("--gre-imaginary", type=Path, nargs="+", default=(), help="imaginary part, with --gre-real")
    p.add_argument("--te", type=float, nargs="+", help="echo times in seconds (default: from the JSON sidecars)")
    p.add_argument("--b0", type=float, help="field strength in tesla (default: from the JSON sidecar)")
    p.add_argument("--subject", default="subject", help="subject identifier for the tables")
    p.add_argument("--group", default="", help="group label for the tables")
    p.add_argument("--dwi-mask", type=Path, help="brain mask on the DWI's grid (default: from the mean b0)")
    p.add_argument("--gre-mask", type=Path, help="brain mask on the GRE's grid (default: from the magnitude)")
    p.add_argument(
        "--tissue-mask",
        type=Path,
        help="grey-matter mask on the DWI's or the GRE's grid for the cortex regions (default: segmented from the "
        "GRE magnitude)",
    )
    _add_pipeline_options(p)
    p.set_defaults(run=_run_run_subject)


def _run_run_subject(args):
    from . import io

    bval, bvec = args.bval, args.bvec
    if not args.dwi.name.endswith(io.NRRD_SUFFIXES):
        stem = io.strip_image_suffix(args.dwi)
        bval, bvec = bval or stem.with_suffix(".bval"), bvec or stem.with_suffix(".bvec")
    inputs = pipeline.SubjectInputs(
        args.subject,
        args.dwi,
        tuple(args.gre_magnitude),
        tuple(args.gre_phase),
        bval,
        bvec,
        tuple(args.te) if args.te else None,
        args.b0,
        args.dwi_mask,
        args.gre_mask,
        args.tissue_mask,
        tuple(args.gre_real),
        tuple(args.gre_imaginary),
    )
    logging.getLogger("ALSQuantLib").setLevel(logging.INFO)
    result = pipeline.run_subject(
        inputs, args.out, options.from_arguments(pipeline.SubjectOptions, args), group=args.group
    )
    for column in pipeline.MARKERS:
        print(f"{column}: {result[column]:.4g}")
    print(
        f"stages run: {', '.join(result['stages_run']) or 'none (all current)'}; quality "
        f"{'passed' if result['qc_passed'] else 'FLAGGED'}"
    )
    print(f"outputs in {args.out}")
    return 0


def _add_run_cohort(subparsers):
    p = subparsers.add_parser("run-cohort", help="every subject of a BIDS-like dataset, in parallel, resumable")
    p.add_argument("dataset", type=Path, help="dataset folder with participants.tsv (participant_id, group)")
    p.add_argument("--workers", type=int, help="parallel local processes (default: the cores available)")
    p.add_argument("--scheduler", help="Dask distributed scheduler address (tcp://host:port) to run the subjects on")
    p.add_argument("--subjects", nargs="+", help="only these participants")
    p.add_argument("--session", help="the BIDS session to use when subjects have several (e.g. ses-01 or 01)")
    p.add_argument("--dwi-run", help="the DWI's run-N to use when a subject has several")
    p.add_argument("--gre-run", help="the GRE's run-N to use when a subject has several")
    _add_pipeline_options(p)
    p.epilog = (
        "Masks named as BIDS derivatives beside a subject's images are used: dwi/<sub>*_desc-brain_mask.nii.gz, "
        "anat/<sub>*_desc-brain_mask.nii.gz (GRE), anat/<sub>*_label-GM_mask.nii.gz. The GRE may carry BIDS "
        "part-mag/phase/real/imag names or dcm2niix's (*_ph, *_real, *_imaginary; echoes _eN)."
    )
    p.set_defaults(run=_run_run_cohort)


def _run_run_cohort(args):

    result = pipeline.run_cohort(
        args.dataset,
        args.out,
        options.from_arguments(pipeline.SubjectOptions, args),
        workers=args.workers,
        scheduler=args.scheduler,
        subjects=args.subjects,
        selection=pipeline.Selection(args.session, args.dwi_run, args.gre_run),
    )
    if result.rows:
        print(f"next: alsquant roc {result.table} --markers {' '.join(pipeline.MARKERS)} --out ROC_DIR")
    return 1 if result.failures else 0


# ----------------------------------------------------------------------------------------------------------------
def build_parser():
    parser = argparse.ArgumentParser(
        prog="alsquant", description="ALS imaging biomarkers: DKI, QSM, atlas labelling and ROC diagnosis."
    )
    parser.add_argument("--version", action="version", version=f"alsquant {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _add_import,
        _add_simulate,
        _add_dki,
        _add_qsm,
        _add_label,
        _add_run_subject,
        _add_run_cohort,
        _add_roc,
        _add_classify,
        _add_demo,
    ):
        add(subparsers)
    return parser


def main(argv=None):
    """Run a command; return its exit code: 0, 1 (some subjects failed), 2 (an input or output problem, explained
    on one line), 130 (interrupted by Ctrl-C or SIGTERM; finished work is kept and a rerun resumes)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    pipeline.interrupt_on_sigterm()  # stop as Ctrl-C does: workers stopped, temporaries removed
    try:
        return args.run(args)
    except InputError as err:
        print(f"alsquant {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the file system failed outside a checked write
        print(f"alsquant {args.command}: error: {outputs.os_error(err, err.filename)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        cause = f" ({interrupt})" if str(interrupt) else ""
        print(f"alsquant {args.command}: interrupted{cause}; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
