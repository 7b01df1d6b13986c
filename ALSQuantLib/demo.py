"""``alsquant demo``: simulate a cohort, run the whole pipeline on every subject, and the ROC analysis.

The phantom's template and labels serve as the atlas; the subjects' own ground-truth labels are used only to score
the registration (Dice), never to measure.
"""

from pathlib import Path

import numpy as np

from . import io, metrics, phantom, pipeline, report, stats
from .atlas import LabelingOptions
from .errors import InputError

COMBINATIONS = ("cst_mk+m1_ms", "cst_mk+cst_md")


def _summary(rows, key, scale=1.0):
    lines = []
    for group in phantom.GROUPS:
        values = np.array([float(row[key]) for row in rows if row["group"] == group], dtype=float) * scale
        if values.size:
            lines.append(
                f"    {group:8s} n={values.size:2d}  median {np.median(values):.3f} "
                f"[{values.min():.3f}-{values.max():.3f}]"
            )
    return lines


REFERENCE_TEXT = {"whole-brain": "the brain mean", "csf": "CSF", "none": "nothing: an arbitrary offset"}


def score_labels(cohort_dir, pipeline_dir, subject):
    """Dice of the propagated CST (DWI space) and M1 (GRE space) against the subject's true labels."""
    scores = {}
    for key, space, region in (("cst_dice", "reference", "CST"), ("m1_dice", "gre", "M1")):
        measured, _ = io.load_image(pipeline_dir / "subjects" / subject / "label" / f"labels_{space}.nii.gz")
        truth_space = "dwi" if space == "reference" else "gre"
        truth, _ = io.load_image(
            cohort_dir / phantom.TRUTH_DIR / subject / f"{subject}_space-{truth_space}_label.nii.gz"
        )
        values = phantom.REGIONS[region]
        scores[key] = metrics.dice(np.isin(measured.astype(int), values), np.isin(truth.astype(int), values))
    return scores


def true_m1_chi(cohort_dir, pipeline_dir, subject, m1_chi, reference):
    """The subject's true M1 χ (the simulator's, relative to CSF) relative to what the measurement is relative to
    (`QSMOptions.reference`): for ``whole-brain``, minus the true χ's mean over the QSM's brain mask; CSF and
    ``none`` (whose offset is arbitrary) keep the simulator's zero."""
    if reference != "whole-brain":
        return m1_chi
    chi, _ = io.load_image(cohort_dir / phantom.TRUTH_DIR / subject / f"{subject}_space-gre_chi.nii.gz")
    mask, _ = io.load_image(pipeline_dir / "subjects" / subject / "qsm" / "mask.nii.gz")
    return m1_chi - float(chi[mask > 0].mean())


def _simulated_already(cohort_dir, n_subjects, seed, als_fraction):
    truth = cohort_dir / phantom.TRUTH_DIR / "truth.tsv"  # written last by the simulation
    if not truth.exists():
        return False
    parameters = io.read_json(cohort_dir / "dataset_description.json").get("PhantomParameters", {})
    return (parameters.get("seed"), parameters.get("n_subjects"), parameters.get("als_fraction")) == (
        seed,
        n_subjects,
        als_fraction,
    )


def run(out_dir, *, n_als=20, n_controls=15, seed=0, workers=None, progress=None):
    """Simulate ``n_als + n_controls`` subjects into `out_dir`, run the pipeline and the ROC analysis; return an
    exit code."""
    if min(n_als, n_controls) < stats.MIN_PER_GROUP:
        raise InputError(
            f"demo: the ROC analysis needs at least {stats.MIN_PER_GROUP} ALS and {stats.MIN_PER_GROUP} control "
            f"subjects"
        )
    out_dir = Path(out_dir)
    n_subjects = n_als + n_controls
    cohort_dir, pipeline_dir = out_dir / "cohort", out_dir / "pipeline"
    if _simulated_already(cohort_dir, n_subjects, seed, n_als / n_subjects):  # a rerun resumes
        truth = io.read_table(cohort_dir / phantom.TRUTH_DIR / "truth.tsv")
        print(f"Using the cohort simulated earlier in {cohort_dir} with the same settings.")
    else:
        truth = phantom.simulate_cohort(
            cohort_dir, n_subjects, seed=seed, als_fraction=n_als / n_subjects, progress=progress
        )
    labeling = LabelingOptions(atlas="phantom", atlas_dir=str(cohort_dir / phantom.TRUTH_DIR / "template"), seed=seed)
    # The phantom has no head, so the magnitude's threshold finds its brain; the template's brain (the default, for
    # real heads) stops at the phantom's cortex, whose FA template is 0 in CSF, and V-SHARP then takes the cortex:
    # M1 slope 0.34 against 0.72 (seed 0).
    options = pipeline.SubjectOptions(labeling=labeling, gre_brain="magnitude")
    result = pipeline.run_cohort(cohort_dir, pipeline_dir, options, workers=workers)
    truth_by_subject = {row["participant_id"]: row for row in truth}
    measured = []
    for row in result.rows:
        subject = row["participant_id"]
        true = truth_by_subject[subject]
        measured.append(
            {
                **row,
                **score_labels(cohort_dir, pipeline_dir, subject),
                **{f"true_{k}": float(true[k]) for k in ("cst_mk", "cst_md", "cst_fa", "m1_chi")},
                "true_m1_chi_referenced": true_m1_chi(
                    cohort_dir, pipeline_dir, subject, float(true["m1_chi"]), options.qsm.reference
                ),
            }
        )
    io.write_table(out_dir / "markers.csv", measured)
    cohort = stats.read_cohort(measured, markers=list(pipeline.MARKERS))
    results, rocs, comparison = stats.analyze(cohort, list(COMBINATIONS), random_seed=seed)
    run = {"cohort": "the demo's simulated cohort", "combine": list(COMBINATIONS), "seed": seed}
    page = report.write_roc_outputs(out_dir / "roc", cohort, results, rocs, comparison, run)
    roc_lines = [
        f"    {m}: {stats.auc_text(r)}, Mann-Whitney p {r['mannwhitney_p']:.2g}" for m, r in results["markers"].items()
    ] + [f"    {c}: {stats.auc_text(r)}" for c, r in results["combinations"].items()]
    column = {
        key: np.array([m[key] for m in measured], dtype=float)
        for key in measured[0]
        if key not in ("participant_id", "group")
    }
    mk_error = column["cst_mk"] - column["true_cst_mk"]
    true_ms = column["true_m1_chi_referenced"]
    ms_slope, _ = np.polyfit(true_ms, column["m1_ms"], 1)
    qsm_options = options.qsm
    lines = [
        f"Simulated cohort: {cohort_dir} ({n_als} ALS, {n_controls} control; seed {seed})",
        "",
        "Ground truth drawn by the simulator:",
        "  CST mean kurtosis",
        *_summary(truth, "cst_mk"),
        "  CST mean diffusivity (x1e-3 mm^2/s)",
        *_summary(truth, "cst_md", 1e3),
        "  M1 susceptibility (ppm, relative to CSF)",
        *_summary(truth, "m1_chi"),
        "",
        f"Measured by ALSQuant (DKI {options.dki.fit_method} fit"
        + (
            f" after head-motion{' and eddy-current' if options.dki.eddy_currents else ''} correction"
            if options.dki.motion_correction
            else ""
        )
        + "; single-echo QSM in the magnitude's brain "
        f"mask: {qsm_options.unwrap} unwrapping, {qsm_options.background.upper()}, {qsm_options.inversion.upper()}"
        + (f" + {qsm_options.tv_bregman} Bregman" if qsm_options.inversion == "tv" and qsm_options.tv_bregman else "")
        + "; atlas labels through",
        "ANTs SyN of each subject's FA to the template FA, inverse transform, GRE linked rigidly):",
        "  CST mean kurtosis",
        *_summary(measured, "cst_mk"),
        "  CST mean diffusivity (x1e-3 mm^2/s)",
        *_summary(measured, "cst_md", 1e3),
        "  CST fractional anisotropy",
        *_summary(measured, "cst_fa"),
        f"  M1 magnetic susceptibility (ppm, relative to {REFERENCE_TEXT[options.qsm.reference]})",
        *_summary(measured, "m1_ms"),
        "  true M1 susceptibility referenced the same way",
        *_summary(measured, "true_m1_chi_referenced"),
        f"  CST MK measured - true: mean {mk_error.mean():+.3f}, SD {mk_error.std():.3f}",
        f"  M1 MS against the truth referenced the same way: correlation "
        f"{np.corrcoef(true_ms, column['m1_ms'])[0, 1]:.2f}, "
        f"slope {ms_slope:.2f} (1 would read the thin cortex at the brain's edge in full; a biomarker needs the "
        f"ranking of subjects kept)",
        f"  Dice of the propagated labels against the truth: CST median {np.median(column['cst_dice']):.2f} "
        f"(min {np.min(column['cst_dice']):.2f}), M1 in grey matter median {np.median(column['m1_dice']):.2f} "
        f"(min {np.min(column['m1_dice']):.2f})",
        f"  table: {out_dir / 'markers.csv'}; per-subject outputs and logs: {pipeline_dir}",
        "",
        "ROC analysis of the measured markers (ALS vs control; DeLong 95 % CI):",
        *roc_lines,
        f"  report: {page}",
    ]
    if result.failures:
        lines += ["", f"Failed subjects (left out): {', '.join(result.failures)}"]
    summary = "\n".join(lines) + "\n"
    io.write_text(out_dir / "demo_summary.txt", summary)
    print(summary, end="")
    print(f"Summary written to {out_dir / 'demo_summary.txt'}")
    return 0
