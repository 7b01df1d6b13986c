"""``alsquant demo``: simulate a cohort and run every pipeline stage that exists on it.

Stages not yet built are named in the output, never imitated. Until atlas labelling exists, regions are taken from
the phantom's ground-truth labels, and the output says so.
"""

from pathlib import Path

import numpy as np

from . import dki, io, phantom

PENDING_STAGES = ("QSM in the pipeline (its M1 accuracy is not yet good enough)", "atlas labelling", "ROC analysis")


def _summary(rows, key, scale=1.0):
    lines = []
    for group in phantom.GROUPS:
        values = np.array([row[key] for row in rows if row["group"] == group], dtype=float) * scale
        if values.size:
            lines.append(
                f"    {group:8s} n={values.size:2d}  median {np.median(values):.3f} "
                f"[{values.min():.3f}-{values.max():.3f}]"
            )
    return lines


def measure_cst_dki(cohort_dir, rows, progress=None):
    """Fit DKI to every subject and measure the CST's MK, MD and FA means in the ground-truth CST labels."""
    measured = []
    for index, row in enumerate(rows):
        subject = row["participant_id"]
        if progress:
            progress(index / len(rows), f"DKI fit {subject}")
        dwi = io.read_dwi(cohort_dir / subject / "dwi" / f"{subject}_dwi.nii.gz")
        labels, _ = io.load_image(cohort_dir / phantom.TRUTH_DIR / subject / f"{subject}_space-dwi_label.nii.gz")
        fit, _, _ = dki.reconstruct(dwi, fit_method="WLS")
        cst = np.isin(labels.astype(int), phantom.REGIONS["CST"])
        measured.append(
            {
                "participant_id": subject,
                "group": row["group"],
                "cst_mk": float(fit.mk[cst].mean()),
                "cst_md": float(fit.md[cst].mean()),
                "cst_fa": float(fit.fa[cst].mean()),
                "true_cst_mk": row["cst_mk"],
                "true_cst_md": row["cst_md"],
                "true_cst_fa": row["cst_fa"],
            }
        )
    return measured


def run(out_dir, *, n_als=20, n_controls=15, seed=0, progress=None):
    """Simulate ``n_als + n_controls`` subjects into `out_dir`, run the stages that exist; return an exit code."""
    out_dir = Path(out_dir)
    n_subjects = n_als + n_controls
    cohort_dir = out_dir / "cohort"
    rows = phantom.simulate_cohort(
        cohort_dir, n_subjects, seed=seed, als_fraction=n_als / n_subjects, progress=progress
    )
    measured = measure_cst_dki(cohort_dir, rows, progress)
    io.write_table(out_dir / "cst_dki.csv", measured)
    mk_error = np.array([m["cst_mk"] - m["true_cst_mk"] for m in measured])
    lines = [
        f"Simulated cohort: {cohort_dir} ({n_als} ALS, {n_controls} control; seed {seed})",
        "",
        "Ground truth drawn by the simulator:",
        "  CST mean kurtosis",
        *_summary(rows, "cst_mk"),
        "  CST mean diffusivity (x1e-3 mm^2/s)",
        *_summary(rows, "cst_md", 1e3),
        "  M1 susceptibility (ppm)",
        *_summary(rows, "m1_chi"),
        "",
        "Measured by ALSQuant (DKI WLS fit; CST from the phantom's ground-truth labels, standing in for atlas",
        "labelling, which is not built yet):",
        "  CST mean kurtosis",
        *_summary(measured, "cst_mk"),
        "  CST mean diffusivity (x1e-3 mm^2/s)",
        *_summary(measured, "cst_md", 1e3),
        "  CST fractional anisotropy",
        *_summary(measured, "cst_fa"),
        f"  CST MK measured - true: mean {mk_error.mean():+.3f}, SD {mk_error.std():.3f}",
        f"  table: {out_dir / 'cst_dki.csv'}",
        "",
        "Not yet built, so not run: " + "; ".join(PENDING_STAGES) + ".",
    ]
    report = "\n".join(lines) + "\n"
    io.write_text(out_dir / "demo_summary.txt", report)
    print(report, end="")
    print(f"Summary written to {out_dir / 'demo_summary.txt'}")
    return 0
