"""DKI Reconstruction: MK, FA, MD (and other DKI/DTI maps) from a multi-shell DWI node."""

import slicer
from slicer import vtkMRMLDiffusionWeightedVolumeNode, vtkMRMLLabelMapVolumeNode
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin
from typing import Annotated

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


class DKIReconstructionWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        from ALSQuantCommon import JobMonitor

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DKIReconstruction.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.monitor = JobMonitor(self.ui.progressBar, self.ui.logText, self.ui.cancelButton, self.ui.applyButton)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.sampleDataButton.connect("clicked(bool)", self.onSampleData)
        self.initializeParameterNode()

    def _logic(self):
        if self.logic is None:
            from ALSQuantCommon import ensureDependencies

            ensureDependencies()
            from DKIReconstructionLib.logic import DKIReconstructionLogic

            self.logic = DKIReconstructionLogic()
        return self.logic

    def cleanup(self):
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(DKIReconstructionParameterNode(ScriptedLoadableModuleLogic().getParameterNode()))
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLDiffusionWeightedVolumeNode")
            if first:
                self._parameterNode.inputVolume = first

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)

    def onSampleData(self):
        self._logic()
        from ALSQuantCommonLib import sample

        with slicer.util.tryWithErrorDisplay("Could not build the sample subject.", waitCursor=True):
            self._parameterNode.inputVolume = sample.loadSampleSubject(slicer.mrmlScene).dwi

    def onApplyButton(self):
        from ALSQuantLib.cli import DKI_MAPS

        logic = self._logic()
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
