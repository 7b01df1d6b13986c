"""End to end: time per subject at the study's resolution, and how a cohort's time grows with its size.

1. One phantom subject at the study's resolution (DWI 256×256×28, GRE 512×512×50): `alsquant run-subject`'s three
   stages, each timed (from its provenance record), and a rerun that finds every stage current.
2. Cohorts of 5 and 20 subjects at the reduced (demo) resolution through `pipeline.run_cohort` with 2 processes,
   and the 5-subject cohort with 1 process: seconds per subject, the 20/5 time ratio (4 for linear growth) and the
   speed-up of two processes over one. Simulation time is not counted. Nothing is asserted.

Run: ``python benchmarks/bench_pipeline.py [--skip-study]``
"""

import sys
import tempfile
import time
from pathlib import Path

from ALSQuantLib import io, phantom, pipeline
from ALSQuantLib.atlas import LabelingOptions


def study_subject(folder):
    start = time.perf_counter()
    phantom.simulate_cohort(folder / "ds", 1, seed=5, config=phantom.PhantomConfig.study())
    print(f"study-resolution subject simulated in {time.perf_counter() - start:.0f} s")
    options = pipeline.SubjectOptions(
        labeling=LabelingOptions(atlas="phantom", atlas_dir=str(folder / "ds" / phantom.TRUTH_DIR / "template"))
    )
    inputs = pipeline.find_subject(folder / "ds", "sub-01")
    start = time.perf_counter()
    pipeline.run_subject(inputs, folder / "out", options)
    total = time.perf_counter() - start
    stages = {
        s: io.read_json(folder / "out" / s / "provenance.json")["results"]["seconds"] for s in ("dki", "qsm", "label")
    }
    start = time.perf_counter()
    rerun = pipeline.run_subject(inputs, folder / "out", options)
    print("one subject at the study's resolution:")
    for stage, seconds in stages.items():
        print(f"  {stage:6s} {seconds:6.1f} s")
    print(f"  total  {total:6.1f} s (with reading, checksums and markers)")
    print(f"  rerun with every stage current: {time.perf_counter() - start:.1f} s, stages run: {rerun['stages_run']}")


def cohort_times(folder):
    phantom.simulate_cohort(folder / "ds", 20, seed=6)
    options = pipeline.SubjectOptions(
        labeling=LabelingOptions(atlas="phantom", atlas_dir=str(folder / "ds" / phantom.TRUTH_DIR / "template"))
    )
    subjects = [f"sub-{i:02d}" for i in range(1, 21)]
    seconds = {}
    for label, n, workers in (
        ("5 subjects, 1 process", 5, 1),
        ("5 subjects, 2 processes", 5, 2),
        ("20 subjects, 2 processes", 20, 2),
    ):
        start = time.perf_counter()
        result = pipeline.run_cohort(
            folder / "ds",
            folder / label.replace(" ", "_").replace(",", ""),
            options,
            workers=workers,
            subjects=subjects[:n],
            echo=lambda line: None,
        )
        seconds[label] = time.perf_counter() - start
        print(
            f"  {label:26s} {seconds[label]:6.1f} s, {seconds[label] / n:5.1f} s per subject, "
            f"{len(result.failures)} failed"
        )
    print(
        f"  growth 5 -> 20 subjects: "
        f"x{seconds['20 subjects, 2 processes'] / seconds['5 subjects, 2 processes']:.2f} (x4 is linear)"
    )
    print(
        f"  two processes over one: x{seconds['5 subjects, 1 process'] / seconds['5 subjects, 2 processes']:.2f} faster"
    )


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="alsquant-bench-") as tmp:
        if "--skip-study" not in sys.argv:
            study_subject(Path(tmp) / "study")
        print("cohorts at the demo's resolution:")
        cohort_times(Path(tmp) / "cohorts")
