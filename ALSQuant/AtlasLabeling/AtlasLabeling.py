"""Atlas Labeling: atlas regions brought into the subject's space by ANTs, and the maps measured in them."""

import pathlib
from typing import Annotated

import slicer
from slicer import vtkMRMLScalarVolumeNode
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleTest

from ALSQuantCommon import PanelWidget

# AtlasLabelingLib.logic imports ALSQuantLib and antspyx, installed on first use: imported only when needed.


class AtlasLabeling(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Atlas Labeling"
        self.parent.categories = ["ALSQuant"]
        self.parent.dependencies = ["ALSQuantCommon"]
        self.parent.contributors = ["ALSQuant developers"]
        self.parent.helpText = (
            "Registers the subject's FA to an atlas template (ANTs rigid, affine, SyN), brings the atlas labels back "
            "through the inverse transform, and measures MK, FA, MD in the CST and susceptibility in M1. See the "
            "ALSQuant README, section Atlas Labeling."
        )
        self.parent.acknowledgementText = "Registration by ANTs (antspyx); runs in a background process."


@parameterNodeWrapper
class AtlasLabelingParameterNode:
    referenceVolume: vtkMRMLScalarVolumeNode
    greMagnitudeVolume: vtkMRMLScalarVolumeNode
    mkVolume: vtkMRMLScalarVolumeNode
    faVolume: vtkMRMLScalarVolumeNode
    mdVolume: vtkMRMLScalarVolumeNode
    msVolume: vtkMRMLScalarVolumeNode
    atlasName: Annotated[str, Choice(["eve", "jhu-icbm-labels", "jhu-tracts", "harvard-oxford", "phantom"])] = "eve"
    atlasDir: pathlib.Path
    atlasSources: pathlib.Path
    rois: str = "CST,M1"
    erosion: int = 0
    faThreshold: float = 0.2
    cortexSegmentation: bool = True
    cortexMarginMm: float = 3.0
    seed: int = 0


def _optionalPath(path):
    """A path field left empty reads back as "." : None then."""
    return str(path) if path is not None and str(path) not in ("", ".") else None


def mapNodesOf(parameterNode):
    """The maps chosen in the panel: name → node."""
    chosen = {"mk": parameterNode.mkVolume, "fa": parameterNode.faVolume, "md": parameterNode.mdVolume, "ms": parameterNode.msVolume}
    return {name: node for name, node in chosen.items() if node is not None}


class AtlasLabelingWidget(PanelWidget):
    moduleName = "AtlasLabeling"
    parameterNodeClass = AtlasLabelingParameterNode

    def onApplyButton(self):
        logic = self.getLogic()
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Atlas labelling could not start.", waitCursor=True):
            job = logic.startBackground(
                p.referenceVolume, atlasName=p.atlasName, atlasDir=_optionalPath(p.atlasDir), atlasSources=_optionalPath(p.atlasSources),
                rois=[r.strip() for r in p.rois.split(",") if r.strip()], mapNodes=mapNodesOf(p), greMagnitudeNode=p.greMagnitudeVolume,
                erosion=p.erosion, faThreshold=p.faThreshold, cortexSegmentation=p.cortexSegmentation,
                cortexMarginMm=p.cortexMarginMm, seed=p.seed,
            )  # fmt: skip
            self.monitor.start(job, self.showResult)

    def showResult(self, outputs):
        slicer.util.setSliceViewerLayers(background=self._parameterNode.referenceVolume, label=outputs["labels"], fit=True)
        slicer.app.layoutManager().setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
        slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(outputs["table"].GetID())
        slicer.app.applicationLogic().PropagateTableSelection()


class AtlasLabelingTest(ScriptedLoadableModuleTest):
    """Inside Slicer: the phantom atlas onto a simulated subject's true FA; CST Dice against its true labels."""

    def runTest(self):
        slicer.mrmlScene.Clear()
        self.test_AtlasLabeling_phantom()

    def test_AtlasLabeling_phantom(self):
        import tempfile

        import numpy as np
        from ALSQuantCommon import ensureDependencies

        ensureDependencies()
        from ALSQuantCommonLib import nodes, sample
        from ALSQuantLib import phantom
        from AtlasLabelingLib.logic import AtlasLabelingLogic

        subject = sample.loadSampleSubject(slicer.mrmlScene)
        fa = nodes.volumeFromImage(slicer.mrmlScene, subject.truth.truth_dwi["fa"], nodes.ijkToRas(subject.dwi), "FA")
        with tempfile.TemporaryDirectory() as folder:
            phantom.write_template(folder, phantom.PhantomConfig())
            out = AtlasLabelingLogic().run(fa, atlasName="phantom", atlasDir=f"{folder}/{phantom.TRUTH_DIR}/template", mapNodes={"fa": fa})
        labels, _ = nodes.imageFromVolume(out["labels"])
        truth = subject.truth.truth_dwi["label"]
        cst, true_cst = np.isin(labels, phantom.REGIONS["CST"]), np.isin(truth, phantom.REGIONS["CST"])
        self.assertGreater(2 * (cst & true_cst).sum() / (cst.sum() + true_cst.sum()), 0.7)
        self.delayDisplay("Atlas Labeling test passed")
