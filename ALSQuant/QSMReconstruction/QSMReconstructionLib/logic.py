"""QSM Reconstruction logic: GRE magnitude and phase nodes in; susceptibility (ppm), local field and mask out."""

import tempfile
from pathlib import Path

import numpy as np
import slicer

from ALSQuantCommonLib import nodes, tasks
from ALSQuantLib import io, qsm


def _echoNodes(value, what):
    """A list of scalar volume nodes (one per echo), or one vector volume node (echoes as components)."""
    nodeList = list(value) if isinstance(value, (list, tuple)) else [value]
    if not nodeList or any(n is None for n in nodeList):
        raise ValueError(f"{what}: select one volume per echo, or one multi-component volume")
    return nodeList


def greFromNodes(magnitudeNodes, phaseNodes, echoTimes, fieldStrength):
    """`ALSQuantLib.io.GRE` from nodes; the B0 direction follows from their geometry (oblique slices included)."""
    arrays, grid = {}, None
    for what, value in (("magnitude", magnitudeNodes), ("phase", phaseNodes)):
        echoes = []
        for node in _echoNodes(value, what):
            data, affine = nodes.imageFromVolume(node, what)
            grid = grid or (data.shape[:3], affine)
            if data.shape[:3] != grid[0] or not np.allclose(affine, grid[1], atol=1e-4):
                raise ValueError(f"{what} {node.GetName()}: not on the first echo's grid")
            echoes.append(data if data.ndim == 4 else data[..., None])
        arrays[what] = np.concatenate(echoes, axis=3).astype(np.float32)
    return io.GRE(arrays["magnitude"], arrays["phase"], grid[1], np.asarray(echoTimes, dtype=float), float(fieldStrength), source="Slicer nodes")


class QSMReconstructionLogic:
    """Susceptibility from GRE nodes: `run` in this process, `startBackground` through ``alsquant qsm``."""

    def __init__(self, scene=None):
        self.scene = scene or slicer.mrmlScene

    def _outputs(self, arrays, referenceNode):
        affine, name = nodes.ijkToRas(referenceNode), referenceNode.GetName()
        made = {}
        for key, data in arrays.items():
            className = "vtkMRMLLabelMapVolumeNode" if key == "mask" else "vtkMRMLScalarVolumeNode"
            made[key] = nodes.volumeFromImage(self.scene, data, affine, f"{name}_{key}", className=className)
        return made

    def run(self, magnitudeNodes, phaseNodes, echoTimes, fieldStrength, *, maskNode=None, unwrap="laplacian",
            background="vsharp", inversion="tv", erosionMm=2.0, progress=None):  # fmt: skip
        """Reconstruct; return {"susceptibility", "local_field", "mask"} → nodes on the GRE's grid."""
        gre = greFromNodes(magnitudeNodes, phaseNodes, echoTimes, fieldStrength)
        mask = nodes.imageFromVolume(maskNode, "mask")[0] > 0 if maskNode is not None else None
        result = qsm.reconstruct_qsm(gre, mask=mask, unwrap=unwrap, background=background, inversion=inversion, erosion_mm=erosionMm, progress=progress)
        arrays = {"susceptibility": result.susceptibility, "local_field": result.local_field, "mask": result.mask.astype(np.uint8)}
        return self._outputs(arrays, _echoNodes(phaseNodes, "phase")[0])

    def startBackground(self, magnitudeNodes, phaseNodes, echoTimes, fieldStrength, *, maskNode=None, unwrap="laplacian",
                        background="vsharp", inversion="tv", erosionMm=2.0, workdir=None):  # fmt: skip
        gre = greFromNodes(magnitudeNodes, phaseNodes, echoTimes, fieldStrength)
        folder = Path(workdir or tempfile.mkdtemp(prefix="alsquant-qsm-"))
        io.save_image(folder / "magnitude.nii.gz", gre.magnitude, gre.affine)
        io.save_image(folder / "phase.nii.gz", gre.phase, gre.affine)
        arguments = ["qsm", "--magnitude", folder / "magnitude.nii.gz", "--phase", folder / "phase.nii.gz",
                     "--te", *gre.echo_times, "--b0", gre.field_strength, "--out", folder / "out", "--unwrap", unwrap,
                     "--background", background, "--inversion", inversion, "--erosion-mm", erosionMm]  # fmt: skip
        if maskNode is not None:
            io.save_image(folder / "mask.nii.gz", nodes.imageFromVolume(maskNode, "mask")[0] > 0, gre.affine, dtype=np.uint8)
            arguments += ["--mask", folder / "mask.nii.gz"]
        referenceNode = _echoNodes(phaseNodes, "phase")[0]

        def load():
            return self._outputs({key: io.load_image(folder / "out" / f"{key}.nii.gz")[0] for key in qsm.QSM_OUTPUTS}, referenceNode)

        return tasks.Job(tasks.BackgroundTask(arguments).start(), load, temporary=None if workdir else folder)
