"""CST MK from a moving patient's DWI: ALSQuant's default fit against DIPY WLS on the same data, in one run.

Data: simulated subjects with the study's protocol (b = 0 ×2, 1000 and 2500 s/mm², 20 directions), SNR 15, head
motion between volumes (up to 3° about each axis and 2 mm along each) and signal dropout in 5 % of the volumes (2 of
42, one per shell, each at 10-40 % of its signal in a third of the slices, as a volume does in the slices acquired
while the head moved during its diffusion encoding). Anatomy: the phantom's own (``--anatomy phantom``, not
evidence) or real (``--anatomy mni152``: MNI152 tissue and JHU's CST, `ALSQuantLib.anatomy`, from
``../shared/data``; needs nilearn).

Fits, each on the subject's true brain: DIPY WLS on the data as acquired; ALSQuant's ``robust`` fit on the data as
acquired (no motion correction); ALSQuant with motion correction and ``robust``; ALSQuant with motion correction and
WLS. ``--still`` simulates no head motion (dropout and, with ``--eddy``, eddy currents stay): what the motion
correction costs a patient who did not move. Printed per subject and as the median over
subjects: CST MK (median over the true CST) against the truth, %, and the dropped (slice, volume) pairs found.
Nothing is asserted.

With ``--eddy`` the diffusion-weighted volumes also carry eddy-current distortions (`phantom.eddy_distortions`: up
to 2 % scaling and shear and 2 mm shift along the phase-encoding axis at b = 2500). A column fits ``robust`` after
the motion and eddy-current correction (``--eddy-currents``) either way.

With ``--signal dipy`` the signal is not our simulator's (one tensor and a kurtosis tensor isotropic in shape) but
DIPY's multi-compartment one (`dipy.sims.voxel.multi_tensor`, as in DIPY's DKI example): in each voxel an
intra-axonal stick-like tensor (Da, 0, 0) and an extra-axonal tensor (De∥, De⊥, De⊥) along the fibre, Da/De∥ as in
that example (0.99/2.26), the stick's fraction chosen so that the voxel's kurtosis (DIPY's ``multi_tensor_dki``) has
the truth's MK, and FA and MD the truth's. A sum of compartments is not a kurtosis model: at b = 2500 its
higher-order terms are not negligible, so a column also gives what WLS fits on the same subject without noise,
motion or dropout (what DKI can see).

Run: ``python benchmarks/bench_dki_patient.py [--subjects 3] [--anatomy phantom|mni152] [--eddy] [--signal dipy]
[--still]``
"""

import argparse
import dataclasses
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

from ALSQuantLib import anatomy, dki, io, motion, phantom

PROJECT = Path(__file__).resolve().parents[1]
# the fit alone: the benchmark corrects motion and eddy currents itself, where a column says so
ROBUST = dki.DKIOptions(motion_correction=False, eddy_currents=False)


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


# DIPY's DKI example's white matter: intra-axonal (0.99, 0, 0), extra-axonal (2.26, 0.87, 0.87) µm²/ms
DA_OVER_DE = 0.99 / 2.26
STICK_FRACTIONS = np.linspace(0.0, 0.9, 91)
FA_GRID = np.linspace(0.0, 0.95, 39)


def compartments(fa, md, stick):
    """Eigenvalues (Da, De∥, De⊥) giving the tensor of (`fa`, `md`) with a stick of fraction `stick`."""
    lam_par, lam_perp = phantom.diffusion_eigenvalues(fa, md)
    de_par = lam_par / (stick * DA_OVER_DE + 1.0 - stick)
    return DA_OVER_DE * de_par, de_par, lam_perp / (1.0 - stick)


def stick_fraction_table(fa_grid):
    """MK (DIPY's multi_tensor_dki, our exact MK) for each FA on `fa_grid` and each of STICK_FRACTIONS; MK rises
    with the stick's fraction."""
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import decompose_tensor, from_lower_triangular
    from dipy.sims.voxel import multi_tensor_dki

    bvals, bvecs = phantom.acquisition_scheme()
    table = gradient_table(bvals, bvecs=bvecs)
    mk = np.zeros((len(fa_grid), len(STICK_FRACTIONS)))
    for i, fa in enumerate(fa_grid):
        for j, stick in enumerate(STICK_FRACTIONS):
            da, de_par, de_perp = compartments(fa, 1e-3, stick)
            mevals = [[da, 0.0, 0.0], [de_par, de_perp, de_perp]]
            _, dt, kt = multi_tensor_dki(
                table, mevals, angles=((0, 0), (0, 0)), fractions=(100 * stick, 100 * (1 - stick)), snr=None
            )
            evals, evecs = decompose_tensor(from_lower_triangular(dt))
            mk[i, j] = dki.tensor_measures(evals[None], evecs[None], kt[None], max_kurtosis=np.inf)["mk"][0]
    return mk


class TwoCompartments:
    """A signal with `phantom.dki_signal`'s parameters: DIPY's two-compartment signal with the truth's FA, MD, MK."""

    def __init__(self):
        self.mk_table = stick_fraction_table(FA_GRID)  # MK does not depend on MD: the compartments scale with it

    def parameters(self, fa, md, mk):
        """Stick fraction and (Da, De∥, De⊥) of each voxel: the table interpolated linearly in FA."""
        fa = np.clip(np.asarray(fa, dtype=float), FA_GRID[0], FA_GRID[-1])
        position = np.interp(fa, FA_GRID, np.arange(len(FA_GRID)))
        row = np.minimum(position.astype(int), len(FA_GRID) - 2)
        weight = (position - row)[:, None]
        mk_rows = (1 - weight) * self.mk_table[row] + weight * self.mk_table[row + 1]
        stick = np.array([np.interp(k, table, STICK_FRACTIONS) for k, table in zip(np.ravel(mk), mk_rows)])
        return stick, compartments(fa, md, stick)

    def __call__(self, bvals, bvecs, fa, md, mk, fibre, s0=1.0):
        stick, (da, de_par, de_perp) = self.parameters(fa, md, mk)
        cos2 = (np.asarray(fibre) @ np.asarray(bvecs).T) ** 2
        b = np.asarray(bvals, dtype=float)[None, :]
        intra = np.exp(-b * da[:, None] * cos2)
        extra = np.exp(-b * (de_perp[:, None] + (de_par - de_perp)[:, None] * cos2))
        return np.asarray(s0)[..., None] * (stick[:, None] * intra + (1 - stick)[:, None] * extra)

    def largest_difference_from_dipy(self, rng, n=50):
        """Against DIPY's own `multi_tensor` on random voxels: a self-check, printed."""
        from dipy.core.gradients import gradient_table
        from dipy.sims.voxel import multi_tensor

        bvals, bvecs = phantom.acquisition_scheme()
        table = gradient_table(bvals, bvecs=bvecs)
        fa, md, mk = rng.uniform(0.1, 0.9, n), rng.uniform(0.6e-3, 1.0e-3, n), rng.uniform(0.6, 1.2, n)
        fibre = rng.normal(size=(n, 3))
        fibre /= np.linalg.norm(fibre, axis=1, keepdims=True)
        ours = self(bvals, bvecs, fa, md, mk, fibre)
        stick, (da, de_par, de_perp) = self.parameters(fa, md, mk)
        worst = 0.0
        for k in range(n):
            angle = (np.degrees(np.arccos(fibre[k, 2])), np.degrees(np.arctan2(fibre[k, 1], fibre[k, 0])))
            peer, _ = multi_tensor(
                table,
                np.array([[da[k], 0.0, 0.0], [de_par[k], de_perp[k], de_perp[k]]]),
                angles=(angle, angle),
                fractions=(100 * stick[k], 100 * (1 - stick[k])),
                snr=None,
            )
            worst = max(worst, float(np.abs(peer - ours[k]).max()))
        return worst


def columns(values, sign):
    """The figures under the table's headings."""
    widths = (7, 12, 13, 12, 32, 36)
    return "   ".join(f"{v:{sign}{w}.1f}" for v, w in zip(values, widths))


def cst_mk_error(mk, cst, truth):
    return 100 * (np.median(mk[cst]) / truth - 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=3)
    parser.add_argument("--anatomy", choices=("phantom", "mni152"), default="phantom")
    parser.add_argument("--eddy", action="store_true", help="add eddy currents, and a fit after correcting them")
    parser.add_argument("--signal", choices=("ours", "dipy"), default="ours", help="the simulator's DWI signal")
    parser.add_argument("--still", action="store_true", help="no head motion")
    args = parser.parse_args()
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dki import DiffusionKurtosisModel

    overrides = {"snr_dwi": 15.0, "dwi_motion_deg": 3.0, "dwi_motion_mm": 2.0, "gre_shape": (8, 8, 8)}
    if args.still:
        overrides.update(dwi_motion_deg=0.0, dwi_motion_mm=0.0)
    if args.eddy:
        overrides.update(dwi_eddy_fraction=0.02, dwi_eddy_mm=2.0)
    signal = phantom.dki_signal
    if args.signal == "dipy":
        signal = TwoCompartments()
        worst = signal.largest_difference_from_dipy(rng=np.random.default_rng(0))
        print(f"two-compartment signal against DIPY's multi_tensor: {worst:.1e} at most")
    with tempfile.TemporaryDirectory(prefix="alsquant-patient-") as tmp:
        real = None
        config = phantom.PhantomConfig(**overrides)
        if args.anatomy == "mni152":
            sys.path.insert(0, str(PROJECT / "Testing" / "Python"))
            from conftest import SHARED_DATA, fsl_layout

            real = anatomy.real_anatomy(str(fsl_layout(SHARED_DATA, Path(tmp) / "fsl")))
            config = phantom.with_overrides(anatomy.anatomy_config(), **overrides)
        still_config = phantom.with_overrides(
            config, snr_dwi=1e6, dwi_motion_deg=0.0, dwi_motion_mm=0.0, dwi_eddy_fraction=0.0, dwi_eddy_mm=0.0
        )
        print(
            f"{args.anatomy} anatomy, DWI {config.dwi_shape} at {config.dwi_voxel_size} mm, SNR 15, "
            + ("no motion" if args.still else "motion")
            + ", dropout"
            + (", eddy currents" if args.eddy else "")
            + f", {args.signal} signal"
        )
        print(
            "subject   DIPY WLS   robust as acquired   ALSQuant robust   ALSQuant WLS"
            + "   robust, eddy currents corrected"
            + "   WLS without noise, motion or dropout"
            + "   (CST MK vs truth, %; the last three after motion correction)   dropped pairs found / true"
        )
        rows = []
        for k in range(args.subjects):
            group = "ALS" if k % 2 else "control"
            subject = phantom.simulate_subject(group, 200 + k, config, real or phantom.AnalyticAnatomy, signal)
            dwi, labels = subject.dwi, subject.truth_dwi["label"]
            brain, cst = labels > 0, np.isin(labels, phantom.REGIONS["CST"])
            data = np.array(dwi.data)
            truth_pairs = drop_out(data, dwi.bvals, np.random.default_rng(300 + k))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                table = gradient_table(dwi.bvals, bvecs=dwi.bvecs_voxel)
                dipy_mk = DiffusionKurtosisModel(table, fit_method="WLS").fit(data, mask=brain).mk(-3 / 7, 10)
            errors = [cst_mk_error(dipy_mk, cst, subject.values["cst_mk"])]
            acquired, _, _ = dki.reconstruct(io.DWI(data, dwi.affine, dwi.bvals, dwi.bvecs), ROBUST, mask=brain)
            errors.append(cst_mk_error(acquired.mk, cst, subject.values["cst_mk"]))
            corrected, turned, _ = motion.correct(data, dwi.affine, dwi.bvals, dwi.bvecs, b0_threshold=50.0)
            still = io.DWI(corrected, dwi.affine, dwi.bvals, turned, source="patient")  # as --motion-correction
            robust, _, details = dki.reconstruct(still, ROBUST, mask=brain)
            errors.append(cst_mk_error(robust.mk, cst, subject.values["cst_mk"]))
            wls, _, _ = dki.reconstruct(still, dataclasses.replace(ROBUST, fit_method="WLS"), mask=brain)
            errors.append(cst_mk_error(wls.mk, cst, subject.values["cst_mk"]))
            corrected, turned, _ = motion.correct(
                data, dwi.affine, dwi.bvals, dwi.bvecs, b0_threshold=50.0, eddy_currents=True
            )
            undistorted = io.DWI(corrected, dwi.affine, dwi.bvals, turned, source="patient")
            eddy, _, _ = dki.reconstruct(undistorted, ROBUST, mask=brain)
            errors.append(cst_mk_error(eddy.mk, cst, subject.values["cst_mk"]))
            clean = phantom.simulate_subject(group, 200 + k, still_config, real or phantom.AnalyticAnatomy, signal)
            visible, _, _ = dki.reconstruct(clean.dwi, dataclasses.replace(ROBUST, fit_method="WLS"), mask=brain)
            errors.append(cst_mk_error(visible.mk, cst, subject.values["cst_mk"]))
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
