"""Head-motion correction against DIPY's, in one run: speed and accuracy of the poses found.

Data: subjects made from real anatomy (`ALSQuantLib.anatomy`: MNI152 tissue, real FA, the CST from JHU's tracts)
with head motion between volumes (`phantom.head_motion`: up to 3° about each axis and 2 mm along each), on the
study's DWI grid (256×256×28, 0.94×0.94×5 mm, 42 volumes); ``--phantom`` uses the analytic phantom instead (not
evidence) and ``--small`` the simulator's small grid. Per subject: `ALSQuantLib.motion.correct` (ANTs rigid,
in-plane voxels merged to about 2.5 mm) on every volume, whole seconds a subject; the same registration with the
settings used before (`BEFORE`: 100/50/25 iterations, half of every voxel sampled) on ``--compare-volumes`` volumes;
DIPY's ``affine_registration`` (rigid, mutual information, from the identity, on the same merged copies) on as many;
both against the first b = 0 volume, to which the true poses are relative. Printed: seconds a volume of each, their
ratios, and how far each put the corners of a brain-sized box from their true places (median, largest). Nothing is
asserted; machines are shared and noisy.

With ``--eddy`` the subjects' diffusion-weighted volumes also carry eddy-current distortions
(`phantom.eddy_distortions`: up to 2 % scaling and shear and 2 mm shift along the phase-encoding axis at b = 2500),
and the correction runs without and with ``eddy_currents``. For every run, how far the gradients were turned from
the truth is printed too.

Run: ``python benchmarks/bench_motion.py [--subjects 2] [--compare-volumes 6] [--eddy] [--phantom] [--small]
[--fsldir DIR]``;
without ``--fsldir`` an FSL layout is made from ``../shared/data``.
"""

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ALSQuantLib import anatomy, geometry, motion, phantom
from ALSQuantLib.registration import register, rigid_pose

PROJECT = Path(__file__).resolve().parents[1]
BOX = np.array([[x, y, z] for x in (-60, 60) for y in (-75, 75) for z in (-50, 50)], float)
BEFORE = {
    "aff_iterations": (100, 50, 25),
    "aff_shrink_factors": (4, 2, 1),
    "aff_smoothing_sigmas": (2, 1, 0),
    "aff_random_sampling_rate": 0.5,
}


def corner_error(pose, true):
    difference = pose - true
    return np.linalg.norm(BOX @ difference[:3, :3].T + difference[:3, 3], axis=1).max()


def summary(name, seconds, errors):
    return f"{name}: {seconds:.2f} s a volume; corners {np.median(errors):.2f} mm median, {max(errors):.2f} mm at most"


def compare(dwi, true_poses, volumes):
    """Seconds a volume and corner errors of the settings used before and of DIPY's rigid registration."""
    from dipy.align import affine_registration

    shape, coarse_affine = motion.coarse_grid(dwi.data.shape[:3], dwi.affine)

    def coarse(volume):
        return geometry.resample(volume, dwi.affine, shape, coarse_affine, order=1)

    reference = coarse(dwi.data[..., np.flatnonzero(dwi.bvals <= 50)[0]])  # the poses are relative to the first b = 0
    results = {}
    start = time.perf_counter()
    errors = []
    for n in volumes:
        registration = register(
            coarse(dwi.data[..., n]),
            coarse_affine,
            reference,
            coarse_affine,
            transform="Rigid",
            similarity=False,
            **BEFORE,
        )
        errors.append(corner_error(rigid_pose(registration), true_poses[n]))
        registration.cleanup()
    results["ANTs as before"] = ((time.perf_counter() - start) / len(volumes), errors)
    start = time.perf_counter()
    errors = []
    for n in volumes:
        _, pose = affine_registration(
            coarse(dwi.data[..., n]),
            reference,
            moving_affine=coarse_affine,
            static_affine=coarse_affine,
            pipeline=["rigid"],
            level_iters=[100, 50, 0],
        )
        errors.append(corner_error(pose, true_poses[n]))
    results["DIPY affine_registration (rigid)"] = ((time.perf_counter() - start) / len(volumes), errors)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=2)
    parser.add_argument("--compare-volumes", type=int, default=6)
    parser.add_argument("--phantom", action="store_true", help="the analytic phantom instead of real anatomy")
    parser.add_argument("--small", action="store_true", help="the simulator's small grid instead of the study's")
    parser.add_argument("--fsldir", type=Path)
    parser.add_argument(
        "--eddy",
        action="store_true",
        help="add eddy-current distortions (up to 2 %% scaling and shear, 2 mm shift along the phase-encoding axis "
        "at b = 2500) and correct them: what the rigid correction leaves of them, and what the eddy-current one",
    )
    args = parser.parse_args()
    logging.disable(logging.INFO)  # DIPY's registration logs every stage
    overrides = {"dwi_motion_deg": 3.0, "dwi_motion_mm": 2.0, "gre_shape": (8, 8, 8), "gre_voxel_size": (20.0,) * 3}
    if args.eddy:
        overrides.update(dwi_eddy_fraction=0.02, dwi_eddy_mm=2.0)
    config = phantom.with_overrides(
        phantom.PhantomConfig() if args.small else phantom.PhantomConfig.study(), **overrides
    )
    with tempfile.TemporaryDirectory(prefix="alsquant-motion-") as tmp:
        template = phantom.AnalyticAnatomy
        if not args.phantom:
            fsldir = args.fsldir
            if fsldir is None:
                sys.path.insert(0, str(PROJECT / "Testing" / "Python"))
                from conftest import SHARED_DATA, fsl_layout

                fsldir = fsl_layout(SHARED_DATA, Path(tmp) / "fsl")
            template = anatomy.real_anatomy(str(fsldir))
            config = anatomy.anatomy_config(config)
        for seed in range(200, 200 + args.subjects):
            subject = phantom.simulate_subject("control", seed, config, anatomy=template)
            dwi = subject.dwi
            print(
                f"subject {seed} ({'phantom' if args.phantom else 'real anatomy'}): grid {dwi.data.shape[:3]} at "
                f"{np.round(geometry.voxel_sizes(dwi.affine), 2)} mm, {dwi.data.shape[3]} volumes"
            )
            for eddy_currents in (False, True) if args.eddy else (False,):
                start = time.perf_counter()
                _, turned, poses = motion.correct(
                    dwi.data, dwi.affine, dwi.bvals, dwi.bvecs, b0_threshold=50.0, eddy_currents=eddy_currents
                )
                seconds = time.perf_counter() - start
                errors = [corner_error(p, t) for p, t in zip(poses[1:], subject.dwi_motion[1:])]
                ours = seconds / (dwi.data.shape[3] - 1)
                name = "ANTs rigid, then eddy currents" if eddy_currents else "ANTs rigid"
                print(f"  ALSQuant ({name}), every volume registered and resampled: {seconds:.0f} s a subject")
                print("  " + summary(f"ALSQuant ({name})", ours, errors))
                phase = motion.phase_direction(dwi.affine, 1)
                true = [motion.rotation_of(t, phase).T @ g for t, g in zip(subject.dwi_motion, dwi.bvecs)]
                angles = [
                    np.degrees(np.arccos(np.clip(abs(a @ b), -1, 1)))
                    for a, b, bval in zip(true, turned, dwi.bvals)
                    if bval > 50
                ]
                print(f"  gradients {np.median(angles):.2f}° median, {max(angles):.2f}° at most from the truth")
            if args.compare_volumes < 1 or args.eddy:
                continue
            volumes = np.flatnonzero(dwi.bvals > 50)[:: max(1, int(np.sum(dwi.bvals > 50)) // args.compare_volumes)]
            for name, (other, other_errors) in compare(
                dwi, subject.dwi_motion, volumes[: args.compare_volumes]
            ).items():
                print("  " + summary(f"{name}, {len(other_errors)} volumes", other, other_errors))
                print(f"  {name} / ALSQuant time a volume: {other / ours:.2f}x")


if __name__ == "__main__":
    main()
