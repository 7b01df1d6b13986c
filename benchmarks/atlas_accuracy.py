"""Labelling accuracy on the phantom cohort: the figures of the README's atlas section.

For each phantom subject (seeds 0..N-1, odd seeds ALS), the subject's FA is registered to the template's FA and the
template labels are brought back (DWI grid, and GRE grid through the rigid link), as `label_subject` does. The
subject's *true* maps are then measured through the propagated labels, so what is printed is the labelling's own
error: CST MK and MD (with and without one voxel of erosion), and M1 susceptibility in grey matter, whole and in
its core at several margins. Nothing is asserted.

Run: ``python benchmarks/atlas_accuracy.py [N]`` (default 35 subjects, about 10 s each).
"""

import statistics
import sys

import numpy as np

from ALSQuantLib import atlas, dki, geometry, metrics, phantom
from ALSQuantLib.masks import brain_mask, grey_matter_mask

MARGINS_MM = (0.0, 3.0, 4.0)


def measure(seed, config, template):
    subject = phantom.simulate_subject("ALS" if seed % 2 else "control", seed, config)
    fit, _, _ = dki.reconstruct(subject.dwi)
    registration = atlas.register(fit.fa, subject.dwi.affine, template["fa"], template["affine"], random_seed=0)
    magnitude = subject.gre.magnitude[..., 0]
    link = atlas.register(magnitude, subject.gre.affine, fit.fa, subject.dwi.affine, transform="Rigid")
    try:
        dwi = atlas.propagate_labels(
            template["label"], template["affine"], fit.fa.shape, subject.dwi.affine, registration
        )
        gre = atlas.propagate_labels(
            template["label"], template["affine"], magnitude.shape, subject.gre.affine, registration, link=link
        )
    finally:
        registration.cleanup()
        link.cleanup()
    cst = {}
    masks = {("CST", side): dwi == value for side, value in zip(("left", "right"), phantom.REGIONS["CST"])}
    for erosion in (0, 1):
        rows = atlas.roi_statistics(
            {m: subject.truth_dwi[m] for m in ("mk", "md")}, masks, fa=fit.fa, erosion_voxels=erosion
        )
        cst[erosion] = [100 * (r["mean"] / subject.values[f"cst_{r['map']}"] - 1) for r in rows]
    voxel_size = geometry.voxel_sizes(subject.gre.affine)
    grey = grey_matter_mask(magnitude, brain_mask(magnitude, voxel_size))
    m1 = {margin: [] for margin in MARGINS_MM}
    for value in phantom.REGIONS["M1"]:
        region = (gre == value) & grey
        for margin in MARGINS_MM:
            core = atlas.cortex_core(region, grey, voxel_size, margin)
            core = core if core.any() else region
            m1[margin].append(
                (100 * (subject.truth_gre["chi"][core].mean() / subject.values["m1_chi"] - 1), int(core.sum()))
            )
    dice = [metrics.dice(dwi == v, subject.truth_dwi["label"] == v) for v in phantom.REGIONS["CST"]]
    return cst, m1, dice


def summary(errors):
    return (
        f"median {statistics.median(errors):+.1f} %, {min(errors):+.1f} to {max(errors):+.1f} %, "
        f"{sum(abs(e) <= 2 for e in errors)} of {len(errors)} within 2 %"
    )


def main(n_subjects=35):
    config = phantom.PhantomConfig()
    template = phantom.make_template(config)
    cst, m1, dice = {0: [], 1: []}, {margin: [] for margin in MARGINS_MM}, []
    for seed in range(n_subjects):
        c, m, d = measure(seed, config, template)
        for key in cst:
            cst[key] += c[key]
        for margin in MARGINS_MM:
            m1[margin] += m[margin]
        dice += d
        print(
            f"subject {seed:2d}: M1 core {m[3.0][0][0]:+6.2f} / {m[3.0][1][0]:+6.2f} %, CST Dice {d[0]:.2f} / "
            f"{d[1]:.2f}",
            flush=True,
        )
    print(f"\nCST Dice (DWI grid): median {statistics.median(dice):.2f}, {min(dice):.2f} to {max(dice):.2f}")
    for erosion, errors in cst.items():
        print(f"CST true MK and MD, erosion {erosion}: {summary(errors)}")
    for margin, values in m1.items():
        errors, counts = [e for e, _ in values], [n for _, n in values]
        where = "whole, in grey matter" if margin == 0 else f"core {margin:g} mm"
        print(
            f"M1 true susceptibility, {where}: {summary(errors)}; voxels a side median "
            f"{int(np.median(counts))}, fewest {min(counts)}"
        )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 35)
