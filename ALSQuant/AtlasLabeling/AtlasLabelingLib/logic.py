"""Atlas Labeling logic: an atlas and the subject's reference volume(s) in; label maps with a colour table naming
the regions, the registration's affine transform, and a table of ROI statistics out."""

import tempfile
from pathlib import Path

import numpy as np
import slicer

from ALSQuantCommonLib import nodes, tasks
from ALSQuantLib import atlas as atlas_lib
from ALSQuantLib import io


class AtlasLabelingLogic:
    """ANTs registration of the subject's reference (FA) to an atlas, inverse label propagation, ROI statistics.

    `run` works in this process; `startBackground` runs ``alsquant label`` in another.
    """

    def __init__(self, scene=None):
        self.scene = scene or slicer.mrmlScene

    @staticmethod
    def atlasNames():
        return list(atlas_lib.BUILTIN_ATLASES)

    def _outputs(self, referenceNode, greNode, labelImages, entries, rows, transformPath, name):
        colors = nodes.colorTableFromEntries(self.scene, entries, f"{name}_atlas_colors")
        out = {"colorTable": colors}
        for space, node in (("reference", referenceNode), ("gre", greNode)):
            if space in labelImages:
                labelmap = nodes.volumeFromImage(
                    self.scene, labelImages[space].astype(np.int16), nodes.ijkToRas(node), f"{node.GetName()}_atlas_labels", className="vtkMRMLLabelMapVolumeNode"
                )
                labelmap.GetDisplayNode().SetAndObserveColorNodeID(colors.GetID())
                out["labels" if space == "reference" else "greLabels"] = labelmap
        out["table"] = nodes.tableFromRows(self.scene, rows, f"{name}_ROI_statistics")
        out["transform"] = nodes.linearTransformFromItkFile(self.scene, transformPath, f"{name}_to_atlas_affine") if transformPath else None
        return out

    def run(self, referenceNode, *, atlasName="eve", atlasDir=None, atlasSources=None, rois=("CST", "M1"), mapNodes=None, greMagnitudeNode=None,
            referenceContrast="FA", erosion=0, faThreshold=0.2, cortexSegmentation=True, cortexMarginMm=3.0, seed=0, progress=None):  # fmt: skip
        """Label and measure. Returns {"labels", "greLabels" (with a GRE), "colorTable", "table", "transform"}."""
        atlas = atlas_lib.find_atlas(atlasName, atlas_dir=atlasDir, sources=atlasSources)
        reference = nodes.imageFromVolume(referenceNode, "reference")
        maps = {name: nodes.imageFromVolume(node, f"map {name}") for name, node in (mapNodes or {}).items()}
        gre = nodes.imageFromVolume(greMagnitudeNode, "GRE magnitude") if greMagnitudeNode is not None else None
        with tempfile.TemporaryDirectory(prefix="alsquant-transforms-") as kept:
            labeling = atlas_lib.label_subject(
                *reference, atlas, list(rois), template_contrast=referenceContrast, maps=maps, gre_magnitude=gre,
                cortex_segmentation=cortexSegmentation, cortex_margin_mm=cortexMarginMm, erosion_voxels=erosion, fa_threshold=faThreshold, seed=seed,
                subject=referenceNode.GetName(),
                keep_transforms=kept, progress=progress,
            )  # fmt: skip
            affine = next((p for p in labeling.transforms if p.suffix == ".mat"), None)
            images = {space: image for space, (image, _) in labeling.label_images.items()}
            return self._outputs(referenceNode, greMagnitudeNode, images, labeling.table.as_list(), labeling.rows, affine, referenceNode.GetName())

    def startBackground(self, referenceNode, *, atlasName="eve", atlasDir=None, atlasSources=None, rois=("CST", "M1"), mapNodes=None,
                        greMagnitudeNode=None, referenceContrast="FA", erosion=0, faThreshold=0.2, cortexSegmentation=True, cortexMarginMm=3.0,
                        seed=0, workdir=None):  # fmt: skip
        folder = Path(workdir or tempfile.mkdtemp(prefix="alsquant-label-"))
        io.save_image(folder / "reference.nii.gz", *nodes.imageFromVolume(referenceNode, "reference"))
        arguments = ["label", "--reference", folder / "reference.nii.gz", "--reference-contrast", referenceContrast,
                     "--atlas", atlasName, "--rois", ",".join(rois), "--erosion", erosion, "--fa-threshold", faThreshold,
                     "--cortex-margin", cortexMarginMm,
                     "--seed", seed, "--subject", referenceNode.GetName(), "--keep-transforms", "--out", folder / "out"]  # fmt: skip
        if atlasDir:
            arguments += ["--atlas-dir", atlasDir]
        if atlasSources:
            arguments += ["--atlas-sources", atlasSources]
        if not cortexSegmentation:
            arguments.append("--no-cortex-segmentation")
        if greMagnitudeNode is not None:
            io.save_image(folder / "gre.nii.gz", *nodes.imageFromVolume(greMagnitudeNode, "GRE magnitude"))
            arguments += ["--gre-magnitude", folder / "gre.nii.gz"]
        pairs = []
        for name, node in (mapNodes or {}).items():
            io.save_image(folder / f"map_{name}.nii.gz", *nodes.imageFromVolume(node, f"map {name}"))
            pairs.append(f"{name}={folder / f'map_{name}.nii.gz'}")
        if pairs:
            arguments += ["--maps", ",".join(pairs)]

        def load():
            out = folder / "out"
            images = {space: io.load_image(out / f"labels_{space}.nii.gz")[0] for space in ("reference", "gre") if (out / f"labels_{space}.nii.gz").exists()}
            entries = atlas_lib.read_color_table(out / "labels.ctbl").as_list()
            rows = [_typed(row) for row in io.read_table(out / "roi_stats.csv")]
            affine = next(iter(sorted((out / "transforms").glob("*.mat"))), None)
            return self._outputs(referenceNode, greMagnitudeNode, images, entries, rows, affine, referenceNode.GetName())

        return tasks.Job(tasks.BackgroundTask(arguments).start(), load, temporary=None if workdir else folder)


def _typed(row):
    """CSV strings back to numbers where they are numbers."""
    out = {}
    for key, value in row.items():
        try:
            out[key] = float(value) if key not in ("subject", "region", "side", "map", "space", "eroded", "qc_passed") else value
        except ValueError:
            out[key] = value
    return out
