"""Head-motion correction against DIPY's, in one run: speed per volume and accuracy of the poses found.

Data: a phantom subject with head motion between volumes (`phantom.head_motion`: up to 3° about each axis and 2 mm
along each), on the study's DWI grid (256×256×28, 0.94×0.94×5 mm) or, with ``--small``, on 40×48×36 at 3.5 mm.
ALSQuant (`ALSQuantLib.motion.correct`: ANTs rigid, in-plane voxels merged to about 2.5 mm) corrects every volume;
DIPY's ``affine_registration`` (rigid, mutual information, from the identity, on the same merged copies) registers
the first ``--dipy-volumes`` diffusion-weighted volumes to the same reference. Printed: seconds per volume of each and
their ratio, and how far each put the corners of a brain-sized box from their true places (median, largest).
Nothing is asserted; machines are shared and noisy.

Run: ``python benchmarks/bench_motion.py [--small] [--dipy-volumes 6]``
"""

import argparse
import logging
import time

import numpy as np

from ALSQuantLib import geometry, motion, phantom

BOX = np.array([[x, y, z] for x in (-60, 60) for y in (-75, 75) for z in (-50, 50)], float)


def corner_error(pose, true):
    difference = pose - true
    return np.linalg.norm(BOX @ difference[:3, :3].T + difference[:3, 3], axis=1).max()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--dipy-volumes", type=int, default=6)
    args = parser.parse_args()
    logging.disable(logging.INFO)  # DIPY's registration logs every stage
    overrides = {"dwi_motion_deg": 3.0, "dwi_motion_mm": 2.0, "gre_shape": (8, 8, 8), "gre_voxel_size": (20.0,) * 3}
    if args.small:
        config = phantom.PhantomConfig(dwi_shape=(40, 48, 36), dwi_voxel_size=(3.5, 3.5, 3.5), **overrides)
    else:
        config = phantom.PhantomConfig.study(**overrides)
    subject = phantom.simulate_subject("control", 1, config)
    dwi = subject.dwi
    print(
        f"grid {dwi.data.shape[:3]} at {np.round(geometry.voxel_sizes(dwi.affine), 2)} mm, {dwi.data.shape[3]} volumes"
    )

    start = time.perf_counter()
    _, _, poses = motion.correct(dwi.data, dwi.affine, dwi.bvals, dwi.bvecs, b0_threshold=50.0)
    ours = (time.perf_counter() - start) / (dwi.data.shape[3] - 1)
    errors = [corner_error(p, t) for p, t in zip(poses[1:], subject.dwi_motion[1:])]
    print(
        f"ALSQuant (ANTs rigid): {ours:.2f} s per volume; corners {np.median(errors):.2f} mm median, "
        f"{max(errors):.2f} mm at most"
    )

    from dipy.align import affine_registration

    shape, coarse_affine = motion.coarse_grid(dwi.data.shape[:3], dwi.affine)

    def coarse(volume):
        return geometry.resample(volume, dwi.affine, shape, coarse_affine, order=1)

    reference = coarse(dwi.data[..., dwi.bvals <= 50].mean(axis=-1))
    volumes = np.flatnonzero(dwi.bvals > 50)[: args.dipy_volumes]
    start = time.perf_counter()
    dipy_errors = []
    for n in volumes:
        _, pose = affine_registration(
            coarse(dwi.data[..., n]),
            reference,
            moving_affine=coarse_affine,
            static_affine=coarse_affine,
            pipeline=["rigid"],
            level_iters=[100, 50, 0],
        )
        dipy_errors.append(corner_error(pose, subject.dwi_motion[n]))
    dipy = (time.perf_counter() - start) / len(volumes)
    print(
        f"DIPY affine_registration (rigid), {len(volumes)} volumes: {dipy:.2f} s per volume; corners "
        f"{np.median(dipy_errors):.2f} mm median, {max(dipy_errors):.2f} mm at most"
    )
    print(f"DIPY / ALSQuant time per volume: {dipy / ours:.2f}x")


if __name__ == "__main__":
    main()
