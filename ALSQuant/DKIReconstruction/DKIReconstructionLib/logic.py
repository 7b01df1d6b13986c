"""DKI Reconstruction logic: a DWI node in, MK, FA, MD (and other maps) out as scalar volumes on its grid."""

import tempfile
from pathlib import Path

import numpy as np
import slicer

from ALSQuantCommonLib import nodes, tasks
from ALSQuantLib import dki, io
from ALSQuantLib.cli import DKI_MAPS

DEFAULT_MAPS = ("mk", "fa", "md")


class DKIReconstructionLogic:
    """Fit DKI/DTI to a ``vtkMRMLDiffusionWeightedVolumeNode``.

    `run` works in this process (console scripting); `startBackground` runs ``alsquant dki`` in another process
    and its `tasks.Job` loads the same maps when done (the panel's way, so Slicer never freezes).
    """

    def __init__(self, scene=None):
        self.scene = scene or slicer.mrmlScene

    @staticmethod
    def _checkMaps(maps):
        unknown = sorted(set(maps) - set(DKI_MAPS))
        if unknown:
            raise ValueError(f"maps {', '.join(unknown)}: expected some of {', '.join(DKI_MAPS)}")
        return list(maps)

    def _mask(self, maskNode, dwi):
        if maskNode is None:
            return None
        mask, affine = nodes.imageFromVolume(maskNode, "mask")
        if mask.shape != dwi.data.shape[:3] or not np.allclose(affine, dwi.affine, atol=1e-4):
            raise ValueError(f"mask {maskNode.GetName()}: not on the DWI's grid")
        return mask > 0

    def run(self, dwiNode, maskNode=None, *, fitMethod="WLS", denoise=False, gibbs=False, maps=DEFAULT_MAPS, progress=None):
        """Fit and return {map name: scalar volume node}, each with the DWI's IJK→RAS."""
        maps = self._checkMaps(maps)
        dwi = nodes.dwiFromNode(dwiNode)
        fit, _, _ = dki.reconstruct(dwi, mask=self._mask(maskNode, dwi), fit_method=fitMethod, denoise=denoise, gibbs=gibbs, progress=progress)
        affine = nodes.ijkToRas(dwiNode)
        return {m: nodes.volumeFromImage(self.scene, getattr(fit, m), affine, f"{dwiNode.GetName()}_{m.upper()}") for m in maps if m in fit.map_names}

    def startBackground(self, dwiNode, maskNode=None, *, fitMethod="WLS", denoise=False, gibbs=False, maps=DEFAULT_MAPS, workdir=None):
        """Write the DWI (NIfTI + FSL gradients, RAS → image axes done by the writer), start ``alsquant dki``."""
        maps = self._checkMaps(maps)
        dwi = nodes.dwiFromNode(dwiNode)
        folder = Path(workdir or tempfile.mkdtemp(prefix="alsquant-dki-"))
        io.write_dwi(dwi, folder / "dwi.nii.gz")
        arguments = ["dki", folder / "dwi.nii.gz", "--out", folder / "out", "--fit-method", fitMethod, "--maps", ",".join(maps)]
        mask = self._mask(maskNode, dwi)
        if mask is not None:
            io.save_image(folder / "mask.nii.gz", mask, dwi.affine, dtype=np.uint8)
            arguments += ["--mask", folder / "mask.nii.gz"]
        arguments += ["--denoise"] * denoise + ["--gibbs"] * gibbs
        affine, name = nodes.ijkToRas(dwiNode), dwiNode.GetName()

        def load():
            out = {}
            for m in maps:
                path = folder / "out" / f"{m}.nii.gz"
                if path.exists():
                    out[m] = nodes.volumeFromImage(self.scene, io.load_image(path)[0], affine, f"{name}_{m.upper()}")
            return out

        return tasks.Job(tasks.BackgroundTask(arguments).start(), load, temporary=None if workdir else folder)
