"""Atlas registration time per subject at the study's DWI resolution.

A phantom subject's FA on the study's DWI grid (256×256×28 at 0.94×0.94×5 mm) is registered (rigid → affine → SyN,
antspyx) to the phantom's 1 mm FA template, and the template labels are brought back through the inverse transform.
Each configuration runs in a fresh process, because ITK fixes its thread count at first use: single-threaded (the
default, bit-reproducible) and two-threaded; the ratio is printed. Nothing is asserted.

Run: ``python benchmarks/bench_atlas.py``
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from ALSQuantLib import io, phantom

CHILD = """
import sys, time
import numpy as np
from ALSQuantLib import atlas, io, metrics
folder = sys.argv[1]
fa, fa_affine = io.load_image(folder + "/fa.nii.gz")
template, template_affine = io.load_image(folder + "/template_fa.nii.gz")
labels, _ = io.load_image(folder + "/template_label.nii.gz")
truth, _ = io.load_image(folder + "/truth_label.nii.gz")
start = time.perf_counter()
registration = atlas.register(fa, fa_affine, template, template_affine, random_seed=0)
moved = atlas.propagate_labels(labels.astype(int), template_affine, fa.shape, fa_affine, registration)
seconds = time.perf_counter() - start
registration.cleanup()
dice = [metrics.dice(moved == v, truth == v) for v in (4, 5, 6, 7)]
print(seconds, *dice)
"""


def run(folder, threads):
    env = dict(os.environ, ALSQUANT_ANTS_THREADS=str(threads))
    env.pop("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", None)
    out = subprocess.run([sys.executable, "-c", CHILD, folder], capture_output=True, text=True, check=True, env=env)
    values = [float(v) for v in out.stdout.split()]
    return values[0], values[1:]


def main():
    config = phantom.PhantomConfig.study(gre_shape=(8, 8, 8), gre_voxel_size=(20.0, 20.0, 20.0))
    subject = phantom.simulate_subject("ALS", 0, config)
    template = phantom.make_template(config)
    with tempfile.TemporaryDirectory() as tmp:
        io.save_image(Path(tmp) / "fa.nii.gz", subject.truth_dwi["fa"], subject.dwi.affine)
        io.save_image(Path(tmp) / "truth_label.nii.gz", subject.truth_dwi["label"], subject.dwi.affine, dtype=np.uint8)
        io.save_image(Path(tmp) / "template_fa.nii.gz", template["fa"], template["affine"])
        io.save_image(Path(tmp) / "template_label.nii.gz", template["label"], template["affine"], dtype=np.uint8)
        print(f"subject FA {config.dwi_shape} at {config.dwi_voxel_size} mm; template {config.template_shape} at 1 mm")
        times = {}
        for threads in (1, 2):
            times[threads], dice = run(tmp, threads)
            print(
                f"  {threads} thread(s): {times[threads]:.1f} s per subject; Dice CST L/R, M1 L/R: "
                + ", ".join(f"{d:.2f}" for d in dice)
            )
        print(f"  1 thread / 2 threads: {times[1] / times[2]:.2f}x")


if __name__ == "__main__":
    main()
