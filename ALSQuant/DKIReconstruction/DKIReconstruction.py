"""DKI Reconstruction: MK, FA, MD (and other DKI/DTI maps) from a multi-shell DWI node."""

from typing import Annotated

import slicer
from slicer import vtkMRMLDiffusionWeightedVolumeNode, vtkMRMLLabelMapVolumeNode
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleTest

from ALSQuantCommon import PanelWidget

# The logic (DKIReconstructionLib.logic) imports ALSQuantLib, whose packages are installed on first use: it is
# imported only when needed, never when Slicer loads this module.


class DKIReconstruction(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "DKI Reconstruction"
        self.parent.categories = ["ALSQuant"]
        self.parent.dependencies = ["ALSQuantCommon"]
        self.parent.contributors = ["ALSQuant developers"]
        self.parent.helpText = (
            "Fits diffusion kurtosis (and tensor) to a multi-shell DWI (b = 0, 1000, 2500 s/mm² in the study) and makes "
            "MK, FA and MD volumes on the DWI's grid. See the ALSQuant README, section DKI Reconstruction."
        )
        self.parent.acknowledgementText = "Fit equations after DIPY and Tabesh et al. 2011; runs in a background process."


@parameterNodeWrapper
class DKIReconstructionParameterNode:
    inputVolume: vtkMRMLDiffusionWeightedVolumeNode
    maskVolume: vtkMRMLLabelMapVolumeNode
    fitMethod: Annotated[str, Choice(["WLS", "OLS", "CWLS"])] = "WLS"
    denoise: bool = False
    gibbs: bool = False
    allMaps: bool = False


class DKIReconstructionWidget(PanelWidget):
    moduleName = "DKIReconstruction"
    parameterNodeClass = DKIReconstructionParameterNode

    def setupPanel(self):
        self.ui.sampleDataButton.connect("clicked(bool)", self.onSampleData)

    def initializeParameterNode(self):
        PanelWidget.initializeParameterNode(self)
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLDiffusionWeightedVolumeNode")
            if first:
                self._parameterNode.inputVolume = first

    def onSampleData(self):
        self.getLogic()
        from ALSQuantCommonLib import sample

        with slicer.util.tryWithErrorDisplay("Could not build the sample subject.", waitCursor=True):
            self._parameterNode.inputVolume = sample.loadSampleSubject(slicer.mrmlScene).dwi

    def onApplyButton(self):
        from ALSQuantLib.cli import DKI_MAPS

        logic = self.getLogic()
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("DKI reconstruction could not start.", waitCursor=True):
            job = logic.startBackground(
                p.inputVolume, p.maskVolume, fitMethod=p.fitMethod, denoise=p.denoise, gibbs=p.gibbs, maps=DKI_MAPS if p.allMaps else ("mk", "fa", "md")
            )
            self.monitor.start(job, self.showResult)

    def showResult(self, outputs):
        if "mk" in outputs:
            slicer.util.setSliceViewerLayers(background=outputs["mk"], fit=True)


class DKIReconstructionTest(ScriptedLoadableModuleTest):
    """Inside Slicer: a simulated subject's DWI node through the logic; MK and FA in the CST against the truth."""

    def runTest(self):
        slicer.mrmlScene.Clear()
        self.test_DKIReconstruction_phantom()

    def test_DKIReconstruction_phantom(self):
        import numpy as np
        from ALSQuantCommon import ensureDependencies

        ensureDependencies()
        from ALSQuantCommonLib import nodes, sample
        from ALSQuantLib import phantom
        from DKIReconstructionLib.logic import DKIReconstructionLogic

        subject = sample.loadSampleSubject(slicer.mrmlScene)
        maps = DKIReconstructionLogic().run(subject.dwi)
        mk, affine = nodes.imageFromVolume(maps["mk"])
        np.testing.assert_allclose(affine, nodes.ijkToRas(subject.dwi))
        cst = np.isin(subject.truth.truth_dwi["label"], phantom.REGIONS["CST"])
        self.assertAlmostEqual(float(np.median(mk[cst])), subject.values["cst_mk"], delta=0.05)
        self.delayDisplay("DKI Reconstruction test passed")
