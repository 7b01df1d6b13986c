"""QSM speed on the study's grid: 512×512×50 at 0.5×0.5×2 mm, single echo (TE 15 ms, 3 T).

A phantom subject is simulated on that grid and written as NIfTI; a fresh process reads it and runs the whole chain
(phase scaling, mask, unwrapping, background-field removal, TV-ADMM inversion, referencing), printing each step's time,
the total, and the process's peak resident memory. Nothing is asserted; machines are shared and noisy.

No Python QSM package is installed here to compare against, so the figures are absolute; TKD, the cheapest
inversion, runs in the same process as a floor for the chain's cost.

Every option of ``alsquant qsm`` (``--background``, ``--tv-outside``, ...) may be given; the TKD chain takes the same
ones.

Run: ``python benchmarks/bench_qsm.py [--background vsharp|pdf|lbv] [--tv-outside free|penalised] ...``
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ALSQuantLib import io, phantom, qsm
from ALSQuantLib.options import add_arguments, from_arguments, to_argv

CHILD = """
import argparse, dataclasses, json, sys, time
from ALSQuantLib import io, qsm
from ALSQuantLib.options import add_arguments, from_arguments

def peak_gib():  # VmHWM: this process's own peak (ru_maxrss would carry the parent's across fork and exec)
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
    return int(line.split()[1]) / 2**20

parser = argparse.ArgumentParser()
add_arguments(parser, qsm.QSMOptions)
options = from_arguments(qsm.QSMOptions, parser.parse_args(sys.argv[2:]))
folder = sys.argv[1]
gre = io.read_gre(folder + "/mag.nii.gz", folder + "/phase.nii.gz", echo_times=[0.015], field_strength=3.0)
report = {"read_peak_gib": peak_gib()}
for inversion in ("tv", "tkd"):
    start = time.perf_counter()
    result = qsm.reconstruct_qsm(gre, dataclasses.replace(options, inversion=inversion))
    report[inversion] = {"total_s": time.perf_counter() - start, "steps_s": result.timings}
report["peak_gib"] = peak_gib()
print(json.dumps(report))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, qsm.QSMOptions)
    options = from_arguments(qsm.QSMOptions, parser.parse_args())
    config = phantom.PhantomConfig.study(dwi_shape=(8, 8, 8), dwi_voxel_size=(20.0, 20.0, 20.0))
    start = time.perf_counter()
    subject = phantom.simulate_subject("ALS", 0, config)
    print(f"simulated {config.gre_shape} at {config.gre_voxel_size} mm in {time.perf_counter() - start:.1f} s")
    with tempfile.TemporaryDirectory() as tmp:
        io.save_image(Path(tmp) / "mag.nii.gz", subject.gre.magnitude[..., 0], subject.gre.affine)
        io.save_image(Path(tmp) / "phase.nii.gz", subject.gre.phase[..., 0], subject.gre.affine)
        output = subprocess.run(
            [sys.executable, "-c", CHILD, tmp, *to_argv(options)], capture_output=True, text=True, check=True
        )
    report = json.loads(output.stdout.strip().splitlines()[-1])
    print(f"background field removal: {options.background}, TV outside the mask: {options.tv_outside}")
    for inversion in ("tv", "tkd"):
        steps = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in report[inversion]["steps_s"].items())
        print(f"chain with {inversion.upper()}: {report[inversion]['total_s']:.1f} s  ({steps})")
    print(f"TV chain / TKD chain: {report['tv']['total_s'] / report['tkd']['total_s']:.2f}x")
    print(
        f"peak resident memory: {report['read_peak_gib']:.2f} GiB after reading, {report['peak_gib']:.2f} GiB overall"
    )


if __name__ == "__main__":
    main()
