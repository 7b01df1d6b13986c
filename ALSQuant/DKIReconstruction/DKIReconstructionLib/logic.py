"""DKI Reconstruction logic: a DWI node in, MK, FA, MD (and other maps) out as scalar volumes on its grid."""

import numpy as np

from ALSQuantCommonLib import nodes
from ALSQuantCommonLib.logic import StepLogic
from ALSQuantLib import dki, io
from ALSQuantLib import options as options_lib
from ALSQuantLib.errors import InputError

DEFAULT_MAPS = ("mk", "fa", "md")


class DKIReconstructionLogic(StepLogic):
    """Fit DKI/DTI to a ``vtkMRMLDiffusionWeightedVolumeNode`` (the ``alsquant dki`` step, in another process).

    Usable from Slicer's Python console::

        maps = DKIReconstructionLogic().process(getNode("DWI"), DKIOptions(fit_method="CWLS"))
    """

    def process(self, dwiNode, options=None, *, maskNode=None, maps=DEFAULT_MAPS, wait=True, workdir=None):
        """Fit and make one scalar volume per map, each with the DWI's IJK→RAS.

        :param dwiNode: the DWI; b-values and gradients come from the node, its measurement frame honoured.
        :param options: ``ALSQuantLib.dki.DKIOptions`` (default: WLS, no preprocessing).
        :param maskNode: optional brain mask (label map) on the DWI's grid.
        :param maps: map names (``ALSQuantLib.dki.DKI_MAPS``).
        :param wait: block until done and return {map name: node}; else return the running `tasks.Job`.
        :param workdir: keep the inputs written for the command and its outputs there (default: deleted).
        """
        options = options or dki.DKIOptions()
        unknown = sorted(set(maps) - set(dki.DKI_MAPS))
        if unknown:
            raise InputError(f"maps {', '.join(unknown)}: expected some of {', '.join(dki.DKI_MAPS)}")
        dwi = nodes.dwiFromNode(dwiNode)
        folder, temporary = self.workFolder("dki", workdir)
        io.write_dwi(dwi, folder / "dwi.nii.gz")
        arguments = ["dki", folder / "dwi.nii.gz", "--out", folder / "out", "--maps", ",".join(maps)]
        if maskNode is not None:
            mask = nodes.maskOnGrid(maskNode, dwi.data.shape, dwi.affine, "DWI")
            io.save_image(folder / "mask.nii.gz", mask, dwi.affine, dtype=np.uint8)
            arguments += ["--mask", folder / "mask.nii.gz"]
        arguments += options_lib.to_argv(options)
        affine, name = nodes.ijkToRas(dwiNode), dwiNode.GetName()

        def load():
            out = {}
            for m in maps:
                path = folder / "out" / f"{m}.nii.gz"
                if path.exists():
                    out[m] = nodes.volumeFromImage(self.scene, io.load_image(path)[0], affine, f"{name}_{m.upper()}")
            return out

        return self.run(arguments, load, temporary, wait=wait)
