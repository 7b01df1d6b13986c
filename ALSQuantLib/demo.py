"""``alsquant demo``: simulate a cohort and run every pipeline stage that exists on it.

Stages not yet built are named in the output, never imitated.
"""

from pathlib import Path

import numpy as np

from . import io, phantom

PENDING_STAGES = ("DKI fitting", "QSM", "atlas labelling", "ROC analysis")


def _summary(rows, key, scale=1.0):
    lines = []
    for group in phantom.GROUPS:
        values = np.array([row[key] for row in rows if row["group"] == group]) * scale
        if values.size:
            lines.append(
                f"    {group:8s} n={values.size:2d}  median {np.median(values):.3f} "
                f"[{values.min():.3f}-{values.max():.3f}]"
            )
    return lines


def run(out_dir, *, n_als=20, n_controls=15, seed=0, progress=None):
    """Simulate ``n_als + n_controls`` subjects into `out_dir` and summarise; return a process exit code."""
    out_dir = Path(out_dir)
    n_subjects = n_als + n_controls
    cohort_dir = out_dir / "cohort"
    rows = phantom.simulate_cohort(
        cohort_dir, n_subjects, seed=seed, als_fraction=n_als / n_subjects, progress=progress
    )
    lines = [
        f"Simulated cohort: {cohort_dir} ({n_als} ALS, {n_controls} control; seed {seed})",
        "Ground truth drawn by the simulator (not measured):",
        "  CST mean kurtosis",
        *_summary(rows, "cst_mk"),
        "  CST mean diffusivity (x1e-3 mm^2/s)",
        *_summary(rows, "cst_md", 1e3),
        "  M1 susceptibility (ppm)",
        *_summary(rows, "m1_chi"),
        "Not yet built, so not run: " + ", ".join(PENDING_STAGES) + ".",
    ]
    report = "\n".join(lines) + "\n"
    io.write_text(out_dir / "demo_summary.txt", report)
    print(report, end="")
    print(f"Summary written to {out_dir / 'demo_summary.txt'}")
    return 0
