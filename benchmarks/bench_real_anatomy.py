"""Labelling accuracy on subjects made from real anatomy (`ALSQuantLib.anatomy`), the way a patient study runs it.

Each subject: MNI152 tissue, the CST from JHU's tracts and M1 from Harvard-Oxford, under a random pose and smooth
warp, simulated DWI and GRE; then `pipeline.run_subject` with the default atlas (``auto``: JHU tracts and
Harvard-Oxford from the FSL installation, FA registered to FSL's FA template). Printed per subject and as median
[min-max]: CST Dice on the DWI grid and M1 Dice on the GRE grid (against the true labels), the true MK map through
the CST labels and the true χ map through the M1 labels against the same maps through the true labels (%), the
quality flags, and the labelling time. Nothing is asserted.

Run: ``python benchmarks/bench_real_anatomy.py --fsldir DIR [--subjects 10] [--study]``; without ``--fsldir`` an FSL
layout is made from ``../shared/data`` (its MNI FA template standing in for FMRIB58).
"""

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from ALSQuantLib import anatomy, io, metrics, phantom, pipeline
from ALSQuantLib.atlas import LabelingOptions

PROJECT = Path(__file__).resolve().parents[1]


def _through(truth_map, labels, values, true_labels, true_values):
    measured = np.isin(labels, values)
    true = np.isin(true_labels, true_values)
    return 100 * (np.mean(truth_map[measured]) / np.mean(truth_map[true]) - 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fsldir", type=Path)
    parser.add_argument("--subjects", type=int, default=10)
    parser.add_argument("--study", action="store_true", help="the study's grids (DWI 256x256x28, GRE 512x512x50)")
    parser.add_argument(
        "--fa-template",
        type=Path,
        help="white-matter FA of the subjects from this MNI FA map (circular if it is also the registration target)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="alsquant-real-") as tmp:
        tmp = Path(tmp)
        fsldir = args.fsldir
        if fsldir is None:
            sys.path.insert(0, str(PROJECT / "Testing" / "Python"))
            from conftest import SHARED_DATA, fsl_layout

            fsldir = fsl_layout(SHARED_DATA, tmp / "fsl")
        real = anatomy.real_anatomy(str(fsldir), None, str(args.fa_template) if args.fa_template else None)
        config = anatomy.anatomy_config(phantom.PhantomConfig.study() if args.study else None)
        options = pipeline.SubjectOptions(labeling=LabelingOptions(fsldir=str(fsldir)))
        rows = []
        for k in range(args.subjects):
            group = "ALS" if k % 2 else "control"
            subject = phantom.simulate_subject(group, 100 + k, config, anatomy=real)
            name = f"sub-{k + 1:02d}"
            phantom.write_subject(tmp / "ds", name, subject, config)
            out = tmp / "out" / name
            pipeline.run_subject(pipeline.find_subject(tmp / "ds", name), out, options)
            labels = io.load_image(out / "label" / "labels_reference.nii.gz")[0]
            labels_gre = io.load_image(out / "label" / "labels_gre.nii.gz")[0]
            true_dwi, true_gre = subject.truth_dwi["label"], subject.truth_gre["label"]
            quality = io.read_json(out / "label" / "quality.json")
            record = io.read_json(out / "label" / "provenance.json")
            row = {
                "cst_dice": metrics.dice(np.isin(labels, (1, 2)), np.isin(true_dwi, (4, 5))),
                "m1_dice_gre": metrics.dice(np.isin(labels_gre, (3, 4)), np.isin(true_gre, (6, 7))),
                "mk_through_cst_%": _through(subject.truth_dwi["mk"], labels, (1, 2), true_dwi, (4, 5)),
                "chi_through_m1_%": _through(subject.truth_gre["chi"], labels_gre, (3, 4), true_gre, (6, 7)),
                "labelling_s": record["results"]["seconds"],
                "flags": len(quality["flags"]),
            }
            rows.append(row)
            print(name, ", ".join(f"{k} {v:.3g}" for k, v in row.items()), quality["flags"], flush=True)
        print(f"{len(rows)} real-anatomy subjects ({'study' if args.study else 'reduced'} grids):")
        for key in rows[0]:
            values = np.array([r[key] for r in rows])
            print(f"  {key:18s} median {np.median(values):.3g} [{values.min():.3g} to {values.max():.3g}]")


if __name__ == "__main__":
    main()
