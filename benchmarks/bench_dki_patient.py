"""CST MK from a moving patient's DWI: ALSQuant's default fit against DIPY WLS on the same data, in one run.

Data: simulated subjects with the study's protocol (b = 0 ×2, 1000 and 2500 s/mm², 20 directions), SNR 15, head
motion between volumes (up to 3° about each axis and 2 mm along each) and signal dropout in 5 % of the volumes (2 of
42, one per shell, each at 10-40 % of its signal in a third of the slices, as a volume does in the slices acquired
while the head moved during its diffusion encoding). Anatomy: the phantom's own (``--anatomy phantom``, not
evidence) or real (``--anatomy mni152``: MNI152 tissue and JHU's CST, `ALSQuantLib.anatomy`, from
``../shared/data``; needs nilearn).

Fits, each on the subject's true brain: DIPY WLS on the data as acquired; ALSQuant with motion correction and the
default fit (``robust``); ALSQuant with motion correction and WLS. Printed per subject and as the median over
subjects: CST MK (median over the true CST) against the truth, %, and the dropped (slice, volume) pairs found.
Nothing is asserted.

With ``--eddy`` the diffusion-weighted volumes also carry eddy-current distortions (`phantom.eddy_distortions`: up
to 2 % scaling and shear and 2 mm shift along the phase-encoding axis at b = 2500), and a last column fits
``robust`` after the motion and eddy-current correction (``--eddy-currents``).

Run: ``python benchmarks/bench_dki_patient.py [--subjects 3] [--anatomy phantom|mni152] [--eddy]``
"""

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

from ALSQuantLib import anatomy, dki, io, motion, phantom

PROJECT = Path(__file__).resolve().parents[1]


def drop_out(data, bvals, rng):
    """Two diffusion-weighted volumes (one per shell) at 10-40 % of their signal in a third of the slices; returns
    the (slice, volume) pairs dropped."""
    n_slices = data.shape[2]
    dropped = np.zeros((n_slices, len(bvals)), dtype=bool)
    for shell in np.unique(bvals[bvals > 50]):
        volume = rng.choice(np.flatnonzero(bvals == shell))
        start = rng.integers(0, n_slices - n_slices // 3)
        slices = np.arange(start, start + n_slices // 3)
        data[:, :, slices, volume] *= rng.uniform(0.1, 0.4, data.shape[:2] + (len(slices),))
        dropped[slices, volume] = True
    return dropped


def columns(values, sign):
    """The figures under the table's headings."""
    widths = (7, 13, 12, 32)
    return "   ".join(f"{v:{sign}{w}.1f}" for v, w in zip(values, widths))


def cst_mk_error(mk, cst, truth):
    return 100 * (np.median(mk[cst]) / truth - 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=3)
    parser.add_argument("--anatomy", choices=("phantom", "mni152"), default="phantom")
    parser.add_argument("--eddy", action="store_true", help="add eddy currents, and a fit after correcting them")
    args = parser.parse_args()
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dki import DiffusionKurtosisModel

    overrides = {"snr_dwi": 15.0, "dwi_motion_deg": 3.0, "dwi_motion_mm": 2.0, "gre_shape": (8, 8, 8)}
    if args.eddy:
        overrides.update(dwi_eddy_fraction=0.02, dwi_eddy_mm=2.0)
    with tempfile.TemporaryDirectory(prefix="alsquant-patient-") as tmp:
        real = None
        config = phantom.PhantomConfig(**overrides)
        if args.anatomy == "mni152":
            sys.path.insert(0, str(PROJECT / "Testing" / "Python"))
            from conftest import SHARED_DATA, fsl_layout

            real = anatomy.real_anatomy(str(fsl_layout(SHARED_DATA, Path(tmp) / "fsl")))
            config = phantom.with_overrides(anatomy.anatomy_config(), **overrides)
        print(
            f"{args.anatomy} anatomy, DWI {config.dwi_shape} at {config.dwi_voxel_size} mm, SNR 15, motion, dropout"
            + (", eddy currents" if args.eddy else "")
        )
        print(
            "subject   DIPY WLS   ALSQuant robust   ALSQuant WLS"
            + ("   robust, eddy currents corrected" if args.eddy else "")
            + "   (CST MK vs truth, %; all after motion correction but DIPY's)   dropped pairs found / true"
        )
        rows = []
        for k in range(args.subjects):
            group = "ALS" if k % 2 else "control"
            subject = phantom.simulate_subject(group, 200 + k, config, anatomy=real or phantom.AnalyticAnatomy)
            dwi, labels = subject.dwi, subject.truth_dwi["label"]
            brain, cst = labels > 0, np.isin(labels, phantom.REGIONS["CST"])
            data = np.array(dwi.data)
            truth_pairs = drop_out(data, dwi.bvals, np.random.default_rng(300 + k))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                table = gradient_table(dwi.bvals, bvecs=dwi.bvecs_voxel)
                dipy_mk = DiffusionKurtosisModel(table, fit_method="WLS").fit(data, mask=brain).mk(-3 / 7, 10)
            errors = [cst_mk_error(dipy_mk, cst, subject.values["cst_mk"])]
            corrected, turned, _ = motion.correct(data, dwi.affine, dwi.bvals, dwi.bvecs, b0_threshold=50.0)
            still = io.DWI(corrected, dwi.affine, dwi.bvals, turned, source="patient")  # as --motion-correction
            robust, _, details = dki.reconstruct(still, dki.DKIOptions(), mask=brain)
            errors.append(cst_mk_error(robust.mk, cst, subject.values["cst_mk"]))
            wls, _, _ = dki.reconstruct(still, dki.DKIOptions(fit_method="WLS"), mask=brain)
            errors.append(cst_mk_error(wls.mk, cst, subject.values["cst_mk"]))
            if args.eddy:
                corrected, turned, _ = motion.correct(
                    data, dwi.affine, dwi.bvals, dwi.bvecs, b0_threshold=50.0, eddy_currents=True
                )
                undistorted = io.DWI(corrected, dwi.affine, dwi.bvals, turned, source="patient")
                eddy, _, _ = dki.reconstruct(undistorted, dki.DKIOptions(), mask=brain)
                errors.append(cst_mk_error(eddy.mk, cst, subject.values["cst_mk"]))
            found = {tuple(p) for p in details.get("dropouts_slice_volume", [])}
            true = {tuple(p) for p in np.argwhere(truth_pairs).tolist()}
            rows.append(errors)
            print(
                f"sub-{k + 1:02d}   " + columns(errors, "+") + f"   {len(found & true)} of {len(true)} found, "
                f"{len(found - true)} false",
                flush=True,
            )
        rows = np.array(rows)
        print("median    " + columns(np.median(rows, axis=0), "+"))
        print("worst |.| " + columns(np.abs(rows).max(axis=0), ""))


if __name__ == "__main__":
    main()
