"""DKI speed against DIPY and MRtrix3, in one run, on the study protocol.

Data: a phantom subject on a 128×128×28 grid with a brain of about 200 000 voxels, b = 0 (x2), 1000 and
2500 s/mm² with 20 directions, SNR 30. Printed: wall times and ratios (ALSQuant is the numerator of no ratio: each
ratio is peer time / ALSQuant time). Nothing is asserted; machines are shared and noisy.

* WLS fit + all maps (ALSQuant: FA MD AD RD MK AK RK MKT KFA) against DIPY WLS fit + MK, FA, MD.
* WLS fit alone against MRtrix3 ``dwi2tensor -dkt`` (WLS, 2 reweighting iterations, 2 threads) when installed.
  Debian's MRtrix3 3.0.3 has no ``tensor2metric -mk``, so fit is compared with fit.
* CWLS voxels per second against DIPY's CWLS (needs cvxpy) on a subset; the robust fit (dropout detection + CWLS)
  beside it, with and without the Rician noise floor fitted (σ given).
* Peak memory of fit + maps on the 256×256×28 grid, in a child process.

Run: ``python benchmarks/bench_dki.py [--dipy-cwls-voxels 300] [--skip-memory]``
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from ALSQuantLib import dki, io, phantom

GRID = (128, 128, 28)
VOXEL = (1.2, 1.2, 4.4)
SIGMA = 1000.0 / 30  # the phantom's noise at SNR 30


def simulate(shape, voxel, seed=0):
    config = phantom.PhantomConfig(dwi_shape=shape, dwi_voxel_size=voxel, gre_shape=(8, 8, 8), snr_dwi=30.0)
    subject = phantom.simulate_subject("control", seed, config)
    return subject.dwi, subject.truth_dwi["label"] > 0


def timed(label, func, results):
    start = time.perf_counter()
    value = func()
    results[label] = time.perf_counter() - start
    print(f"  {label:<48s} {results[label]:8.2f} s", flush=True)
    return value


def bench_wls(dwi, mask, results):
    bvals, bvecs = dwi.bvals, dwi.bvecs_voxel

    def ours(method, iterations=1, maps=True, noise_sigma=None):
        def run():
            model = dki.DKIModel(bvals, bvecs, fit_method=method, n_iterations=iterations)
            fit = model.fit(dwi.data, mask=mask, noise_sigma=noise_sigma)
            if maps:
                for name in fit.map_names:
                    getattr(fit, name)
            return fit

        return run

    def dipy(method):
        from dipy.core.gradients import gradient_table
        from dipy.reconst.dki import DiffusionKurtosisModel

        def run():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fit = DiffusionKurtosisModel(gradient_table(bvals, bvecs=bvecs), fit_method=method).fit(
                    dwi.data, mask=mask
                )
                return fit.mk(min_kurtosis=-3 / 7, max_kurtosis=10), fit.fa, fit.md

        return run

    timed("ALSQuant WLS fit + all maps", ours("WLS"), results)
    timed("ALSQuant WLS fit only", ours("WLS", maps=False), results)
    timed("ALSQuant WLS fit only, 2 reweightings", ours("WLS", 2, maps=False), results)
    timed("ALSQuant OLS fit + all maps", ours("OLS"), results)
    timed("ALSQuant CWLS fit + all maps", ours("CWLS"), results)
    timed("ALSQuant robust fit + all maps", ours("robust"), results)
    timed("ALSQuant robust fit + Rician floor + all maps", ours("robust", noise_sigma=SIGMA), results)
    timed("DIPY OLS fit + MK, FA, MD", dipy("OLS"), results)
    timed("DIPY WLS fit + MK, FA, MD", dipy("WLS"), results)


def bench_mrtrix(dwi, mask, results):
    if shutil.which("dwi2tensor") is None:
        print("  MRtrix3 dwi2tensor not installed (Debian package mrtrix3): skipped")
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        io.write_dwi(dwi, tmp / "dwi.nii.gz")
        io.save_image(tmp / "mask.nii.gz", mask, dwi.affine, dtype=np.uint8)
        command = [
            "dwi2tensor",
            str(tmp / "dwi.nii.gz"),
            str(tmp / "dt.mif"),
            "-dkt",
            str(tmp / "dkt.mif"),
            "-fslgrad",
            str(tmp / "dwi.bvec"),
            str(tmp / "dwi.bval"),
            "-mask",
            str(tmp / "mask.nii.gz"),
            "-iter",
            "2",
            "-nthreads",
            "2",
            "-quiet",
            "-force",
        ]
        timed(
            "MRtrix3 dwi2tensor -dkt (WLS, 2 iterations, 2 threads)",
            lambda: subprocess.run(command, check=True),
            results,
        )


def bench_cwls(dwi, mask, results, n_voxels):
    try:
        import cvxpy  # noqa: F401
    except ImportError:
        print("  cvxpy not installed: DIPY CWLS skipped")
        return
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dki import DiffusionKurtosisModel

    data = dwi.data[mask][:n_voxels]
    model = DiffusionKurtosisModel(gradient_table(dwi.bvals, bvecs=dwi.bvecs_voxel), fit_method="CWLS")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        timed(f"DIPY CWLS fit, {len(data)} voxels", lambda: model.fit(data), results)
    results["dipy_cwls_voxels"] = len(data)


def peak_memory(shape, voxel):
    """Peak resident memory (GiB) of a fresh process that reads the DWI from NIfTI, then fits and makes all maps."""
    dwi, mask = simulate(shape, voxel)
    with tempfile.TemporaryDirectory() as tmp:
        io.write_dwi(dwi, Path(tmp) / "dwi.nii.gz")
        io.save_image(Path(tmp) / "mask.nii.gz", mask, dwi.affine, dtype=np.uint8)
        code = f"""
from ALSQuantLib import dki, io

def peak_kib():  # VmHWM: this process's own peak (ru_maxrss would carry the parent's across fork and exec)
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])

dwi = io.read_dwi({str(Path(tmp) / "dwi.nii.gz")!r})
mask = io.load_image({str(Path(tmp) / "mask.nii.gz")!r})[0] > 0
loaded = peak_kib()
fit = dki.DKIModel(dwi.bvals, dwi.bvecs_voxel, fit_method="WLS").fit(dwi.data, mask=mask)
for name in fit.map_names:
    getattr(fit, name)
print(int(mask.sum()), dwi.data.nbytes, loaded, peak_kib())
"""
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    voxels, data_bytes, loaded_kib, peak_kib = map(int, out)
    return voxels, data_bytes / 2**30, loaded_kib / 2**20, peak_kib / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dipy-cwls-voxels", type=int, default=300)
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()

    print(f"cores available: {len(os.sched_getaffinity(0))}")
    dwi, mask = simulate(GRID, VOXEL)
    print(f"grid {GRID}, {int(mask.sum())} brain voxels, {dwi.data.shape[3]} volumes, SNR 30")
    results = {}
    _ = dki.DKIModel(dwi.bvals, dwi.bvecs_voxel).fit(dwi.data[:8, :8]).mk  # warm-up: imports, caches
    bench_wls(dwi, mask, results)
    bench_mrtrix(dwi, mask, results)
    bench_cwls(dwi, mask, results, args.dipy_cwls_voxels)

    n = int(mask.sum())
    print("\nratios (peer time / ALSQuant time; > 1 means ALSQuant is faster)")
    print(
        f"  DIPY WLS (fit + MK, FA, MD) / ALSQuant WLS (fit + all maps): "
        f"{results['DIPY WLS fit + MK, FA, MD'] / results['ALSQuant WLS fit + all maps']:.1f}x"
    )
    print(
        f"  DIPY OLS (fit + MK, FA, MD) / ALSQuant OLS (fit + all maps): "
        f"{results['DIPY OLS fit + MK, FA, MD'] / results['ALSQuant OLS fit + all maps']:.1f}x"
    )
    key = "MRtrix3 dwi2tensor -dkt (WLS, 2 iterations, 2 threads)"
    if key in results:
        print(
            f"  MRtrix3 dwi2tensor -dkt / ALSQuant WLS fit (1 reweighting): "
            f"{results[key] / results['ALSQuant WLS fit only']:.2f}x"
        )
        print(
            f"  MRtrix3 dwi2tensor -dkt / ALSQuant WLS fit (2 reweightings): "
            f"{results[key] / results['ALSQuant WLS fit only, 2 reweightings']:.2f}x"
        )
    ours_cwls_rate = n / results["ALSQuant CWLS fit + all maps"]
    print(f"  ALSQuant CWLS: {ours_cwls_rate:,.0f} voxels/s (fit + all maps)")
    print(f"  ALSQuant robust: {n / results['ALSQuant robust fit + all maps']:,.0f} voxels/s (fit + all maps)")
    rician = results["ALSQuant robust fit + Rician floor + all maps"]
    print(f"  ALSQuant robust with the Rician floor (σ given): {n / rician:,.0f} voxels/s (fit + all maps)")
    if "dipy_cwls_voxels" in results:
        dipy_rate = results["dipy_cwls_voxels"] / results[f"DIPY CWLS fit, {results['dipy_cwls_voxels']} voxels"]
        print(f"  DIPY CWLS: {dipy_rate:,.0f} voxels/s; per-voxel ratio {ours_cwls_rate / dipy_rate:.0f}x")

    if not args.skip_memory:
        voxels, data_gib, before, after = peak_memory((256, 256, 28), (0.6, 0.6, 4.4))
        print(
            f"\n256x256x28: {voxels} brain voxels, DWI array {data_gib:.2f} GiB; peak RSS of the process "
            f"{before:.2f} GiB after reading, {after:.2f} GiB after fit + all maps"
        )


if __name__ == "__main__":
    main()
