"""DKI Reconstruction: MK, FA, MD (and other DKI/DTI maps) from a multi-shell DWI node."""

import slicer
from slicer import vtkMRMLDiffusionWeightedVolumeNode, vtkMRMLLabelMapVolumeNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleTest

from ALSQuantCommon import PanelWidget, ensureDependencies, helpText
from ALSQuantCommonLib.parameters import optionsFrom, withOptions
from ALSQuantLib.dki import DKI_MAPS, DKIOptions

# The logic runs the step as an `alsquant dki` command; ALSQuantLib's heavier packages are installed on Apply.


class DKIReconstruction(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("DKI Reconstruction")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "ALSQuant")]
        self.parent.dependencies = ["ALSQuantCommon"]
        self.parent.contributors = ["ALSQuant developers"]
        self.parent.helpText = helpText(
            _(
                "Fits diffusion kurtosis (and tensor) to a multi-shell DWI (b = 0, 1000, 2500 s/mm² in the study) and "
                "makes MK, FA and MD volumes on the DWI's grid."
            ),
            "dki-reconstruction",
        )
        self.parent.acknowledgementText = _(
            "Fit equations after DIPY and Tabesh et al. 2011; runs in a background process."
        )


@parameterNodeWrapper
@withOptions(DKIOptions)
class DKIReconstructionParameterNode:
    """The panel's inputs; the fit's options (fitMethod, denoise, denoiser, gibbs, rician, motionCorrection,
    eddyCurrents, constraints, averageB0, b0Threshold, dtiOnly) come from DKIOptions."""

    inputVolume: vtkMRMLDiffusionWeightedVolumeNode
    maskVolume: vtkMRMLLabelMapVolumeNode
    allMaps: bool = False


class DKIReconstructionWidget(PanelWidget):
    moduleName = "DKIReconstruction"
    parameterNodeClass = DKIReconstructionParameterNode
    requiredInputs = {"inputVolume": _("Select a DWI volume.")}

    def setupPanel(self):
        self.ui.sampleDataButton.connect("clicked(bool)", self.onSampleData)

    def initializeParameterNode(self):
        PanelWidget.initializeParameterNode(self)
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLDiffusionWeightedVolumeNode")
            if first:
                self._parameterNode.inputVolume = first

    def onSampleData(self):
        ensureDependencies()
        from ALSQuantCommonLib import sample

        with slicer.util.tryWithErrorDisplay(_("Could not build the sample subject."), waitCursor=True):
            self._parameterNode.inputVolume = sample.loadSampleSubject(slicer.mrmlScene).dwi

    def onApplyButton(self):
        ensureDependencies()
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("DKI reconstruction could not start."), waitCursor=True):
            maps = DKI_MAPS if p.allMaps else ("mk", "fa", "md")
            job = self.logic.process(p.inputVolume, optionsFrom(p), maskNode=p.maskVolume, maps=maps, wait=False)
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

        ensureDependencies()
        from ALSQuantCommonLib import nodes, sample
        from ALSQuantLib import phantom
        from DKIReconstructionLib.logic import DKIReconstructionLogic

        subject = sample.loadSampleSubject(slicer.mrmlScene)
        maps = DKIReconstructionLogic().process(subject.dwi)
        mk, affine = nodes.imageFromVolume(maps["mk"])
        np.testing.assert_allclose(affine, nodes.ijkToRas(subject.dwi))
        cst = np.isin(subject.truth.truth_dwi["label"], phantom.REGIONS["CST"])
        self.assertAlmostEqual(float(np.median(mk[cst])), subject.values["cst_mk"], delta=0.05)
        self.delayDisplay("DKI Reconstruction test passed")
