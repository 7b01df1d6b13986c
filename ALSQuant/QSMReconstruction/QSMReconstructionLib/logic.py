"""QSM Reconstruction logic: GRE magnitude and phase (or real and imaginary) nodes in; susceptibility (ppm), local
field and mask out."""

import numpy as np

from ALSQuantCommonLib import nodes
from ALSQuantCommonLib.logic import StepLogic
from ALSQuantLib import geometry, io, qsm, workflows
from ALSQuantLib import options as options_lib
from ALSQuantLib.errors import InputError


def _echoNodes(value, what):
    """A list of scalar volume nodes (one per echo), or one vector volume node (echoes as components)."""
    nodeList = list(value) if isinstance(value, (list, tuple)) else [value]
    if not nodeList or any(n is None for n in nodeList):
        raise InputError(f"{what}: select one volume per echo, or one multi-component volume")
    return nodeList


def partsFromNodes(magnitudeNodes=None, phaseNodes=None, realNodes=None, imaginaryNodes=None):
    """The GRE's parts as arrays (i, j, k, echoes) on one grid: {"magnitude", "phase"} or {"real", "imaginary"}
    → array, and the grid's affine."""
    given = {"magnitude": magnitudeNodes, "phase": phaseNodes, "real": realNodes, "imaginary": imaginaryNodes}
    given = {part: value for part, value in given.items() if value is not None and value != []}
    if set(given) not in ({"magnitude", "phase"}, {"real", "imaginary"}):
        raise InputError(
            f"GRE: select magnitude and phase, or real and imaginary parts (got {', '.join(given) or 'none'})"
        )
    arrays, grid = {}, None
    for what, value in given.items():
        echoes = []
        for node in _echoNodes(value, what):
            data, affine = nodes.imageFromVolume(node, what)
            grid = grid or (data.shape[:3], affine)
            if not geometry.same_grid(data.shape, affine, *grid):
                raise InputError(f"{what} {node.GetName()}: not on the first echo's grid")
            echoes.append(data if data.ndim == 4 else data[..., None])
        arrays[what] = np.concatenate(echoes, axis=3).astype(np.float32)
    return arrays, grid[1]


def greFromParts(arrays, affine, echoTimes, fieldStrength):
    """`ALSQuantLib.io.GRE` from `partsFromNodes`' arrays; checks the echo times and the field strength. The B0
    direction follows from the geometry (oblique slices included)."""
    make = io.GRE.from_complex if "real" in arrays else io.GRE
    return make(
        *arrays.values(), affine, np.asarray(echoTimes, dtype=float), float(fieldStrength), source="Slicer nodes"
    )


def parseEchoTimes(text):
    """Echo times in seconds from "0.004, 0.008" (values that look like milliseconds are refused later)."""
    try:
        return [float(t) for t in text.replace(";", ",").split(",") if t.strip()]
    except ValueError:
        raise InputError(f"echo times {text!r}: expected seconds separated by commas, e.g. 0.015") from None


class QSMReconstructionLogic(StepLogic):
    """Susceptibility from GRE nodes (the ``alsquant qsm`` step, in another process).

    Usable from Slicer's Python console::

        out = QSMReconstructionLogic().process([mag1, mag2], [phase1, phase2], [0.005, 0.010], 3.0)
    """

    def process(
        self,
        magnitudeNodes,
        phaseNodes,
        echoTimes,
        fieldStrength,
        options=None,
        *,
        realNodes=None,
        imaginaryNodes=None,
        maskNode=None,
        wait=True,
        workdir=None,
    ):
        """Reconstruct; make susceptibility (ppm) and local field (ppm) volumes and the mask as a label map, on the
        GRE's grid.

        :param magnitudeNodes, phaseNodes: one scalar volume per echo, or one multi-component volume each; None
            with ``realNodes`` and ``imaginaryNodes`` (laid out the same way) instead.
        :param echoTimes: seconds, one per echo.
        :param fieldStrength: tesla.
        :param options: ``ALSQuantLib.qsm.QSMOptions`` (default: path unwrapping, LBV, TV with one Bregman iteration).
        :param maskNode: optional brain mask on the GRE's grid.
        :param wait: block and return {"susceptibility", "local_field", "mask"} → node; else return the job.
        """
        options = options or qsm.QSMOptions()
        arrays, affine = partsFromNodes(magnitudeNodes, phaseNodes, realNodes, imaginaryNodes)
        gre = greFromParts(arrays, affine, echoTimes, fieldStrength)  # checks TE and B0 before starting
        folder, temporary = self.workFolder("qsm", workdir)
        arguments = ["qsm"]
        for part, data in arrays.items():
            io.save_image(folder / f"{part}.nii.gz", data, affine)
            arguments += [f"--{part}", folder / f"{part}.nii.gz"]
        arguments += ["--te", *gre.echo_times, "--b0", gre.field_strength, "--out", folder / "out"]
        if maskNode is not None:
            mask = nodes.maskOnGrid(maskNode, gre.phase.shape, gre.affine, "GRE")
            io.save_image(folder / "mask.nii.gz", mask, gre.affine, dtype=np.uint8)
            arguments += ["--mask", folder / "mask.nii.gz"]
        arguments += options_lib.to_argv(options)
        referenceNode = _echoNodes(phaseNodes if imaginaryNodes is None else imaginaryNodes, "phase")[0]

        def load():
            affine, name = nodes.ijkToRas(referenceNode), referenceNode.GetName()
            made = {}
            for key in workflows.QSM_OUTPUTS:
                className = "vtkMRMLLabelMapVolumeNode" if key == "mask" else "vtkMRMLScalarVolumeNode"
                data = io.load_image(folder / "out" / f"{key}.nii.gz")[0]
                made[key] = nodes.volumeFromImage(self.scene, data, affine, f"{name}_{key}", className=className)
            return made

        return self.run(arguments, load, temporary, wait=wait)
