"""Atlas Labeling logic: an atlas and the subject's reference volume(s) in; label maps with a colour table naming
the regions, the registration's affine transform, and a table of ROI statistics out."""

import numpy as np

from ALSQuantCommonLib import nodes
from ALSQuantCommonLib.logic import StepLogic
from ALSQuantLib import atlas as atlas_lib
from ALSQuantLib import io
from ALSQuantLib import options as options_lib

TEXT_COLUMNS = ("subject", "region", "side", "map", "space", "eroded", "qc_passed")


class AtlasLabelingLogic(StepLogic):
    """ANTs registration of the subject's reference (FA) to an atlas, inverse label propagation, ROI statistics (the
    ``alsquant label`` step, in another process).

    Usable from Slicer's Python console::

        options = LabelingOptions(atlas="eve", atlas_dir="/data/atlases")
        out = AtlasLabelingLogic().process(fa, options, mapNodes={"mk": mk, "fa": fa}, greMagnitudeNode=magnitude)
    """

    @staticmethod
    def atlasNames():
        return list(atlas_lib.BUILTIN_ATLASES)

    def process(self, referenceNode, options=None, *, mapNodes=None, greMagnitudeNode=None, wait=True, workdir=None):
        """Label and measure.

        :param referenceNode: the subject's FA (or T1-like image) in DWI space.
        :param options: ``ALSQuantLib.atlas.LabelingOptions`` (atlas, regions, erosion, FA threshold, cortex, seed).
        :param mapNodes: name → volume to measure ("mk", "fa", "md", "ms"), on the reference's grid or the GRE's.
        :param greMagnitudeNode: optional GRE magnitude, linked rigidly to the reference.
        :param wait: block and return {"labels", "greLabels" (with a GRE), "colorTable", "table", "transform"};
            else return the running job.
        """
        options = options or atlas_lib.LabelingOptions()
        if not options.atlas_sources:  # a missing atlas is reported before anything starts (downloads run in the job)
            atlas_lib.atlas_for(options)
        folder, temporary = self.workFolder("label", workdir)
        io.save_image(folder / "reference.nii.gz", *nodes.imageFromVolume(referenceNode, "reference"))
        name = referenceNode.GetName()
        arguments = [
            "label",
            "--reference",
            folder / "reference.nii.gz",
            "--subject",
            name,
            "--keep-transforms",
            "--out",
            folder / "out",
            *options_lib.to_argv(options),
        ]
        if greMagnitudeNode is not None:
            io.save_image(folder / "gre.nii.gz", *nodes.imageFromVolume(greMagnitudeNode, "GRE magnitude"))
            arguments += ["--gre-magnitude", folder / "gre.nii.gz"]
        pairs = []
        for mapName, node in (mapNodes or {}).items():
            io.save_image(folder / f"map_{mapName}.nii.gz", *nodes.imageFromVolume(node, f"map {mapName}"))
            pairs.append(f"{mapName}={folder / f'map_{mapName}.nii.gz'}")
        if pairs:
            arguments += ["--maps", ",".join(pairs)]

        def load():
            out = folder / "out"
            colors = nodes.colorTableFromEntries(
                self.scene, atlas_lib.read_color_table(out / "labels.ctbl").as_list(), f"{name}_atlas_colors"
            )
            made = {"colorTable": colors}
            for space, node, key in (("reference", referenceNode, "labels"), ("gre", greMagnitudeNode, "greLabels")):
                path = out / f"labels_{space}.nii.gz"
                if path.exists():
                    labelmap = nodes.volumeFromImage(
                        self.scene,
                        io.load_image(path)[0].astype(np.int16),
                        nodes.ijkToRas(node),
                        f"{node.GetName()}_atlas_labels",
                        className="vtkMRMLLabelMapVolumeNode",
                    )
                    labelmap.GetDisplayNode().SetAndObserveColorNodeID(colors.GetID())
                    made[key] = labelmap
            rows = [_typed(row) for row in io.read_table(out / "roi_stats.csv")]
            made["table"] = nodes.tableFromRows(self.scene, rows, f"{name}_ROI_statistics")
            affine = next(iter(sorted((out / "transforms").glob("*.mat"))), None)
            made["transform"] = (
                nodes.linearTransformFromItkFile(self.scene, affine, f"{name}_to_atlas_affine") if affine else None
            )
            return made

        return self.run(arguments, load, temporary, wait=wait)


def _typed(row):
    """CSV strings back to numbers where they are numbers."""
    out = {}
    for key, value in row.items():
        try:
            out[key] = value if key in TEXT_COLUMNS else float(value)
        except ValueError:
            out[key] = value
    return out
