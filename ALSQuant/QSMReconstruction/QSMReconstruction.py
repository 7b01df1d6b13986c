"""QSM Reconstruction: magnetic susceptibility (ppm) from GRE magnitude and phase nodes."""

from typing import Annotated

import slicer
from slicer import vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleTest

from ALSQuantCommon import PanelWidget

# QSMReconstructionLib.logic imports ALSQuantLib, installed on first use: imported only when needed.


class QSMReconstruction(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "QSM Reconstruction"
        self.parent.categories = ["ALSQuant"]
        self.parent.dependencies = ["ALSQuantCommon"]
        self.parent.contributors = ["ALSQuant developers"]
        self.parent.helpText = (
            "Quantitative susceptibility mapping from a (single- or multi-echo) 3D GRE: phase scaling, unwrapping, brain "
            "mask, background-field removal, dipole inversion. The B0 direction comes from the volumes' geometry. See "
            "the ALSQuant README, section QSM Reconstruction."
        )
        self.parent.acknowledgementText = "Runs in a background process."


@parameterNodeWrapper
class QSMReconstructionParameterNode:
    magnitudeVolume: vtkMRMLScalarVolumeNode
    phaseVolume: vtkMRMLScalarVolumeNode
    maskVolume: vtkMRMLLabelMapVolumeNode
    echoTimes: str = "0.015"
    fieldStrength: float = 3.0
    unwrap: Annotated[str, Choice(["laplacian", "path"])] = "laplacian"
    background: Annotated[str, Choice(["vsharp", "pdf"])] = "vsharp"
    inversion: Annotated[str, Choice(["tv", "tkd", "cg"])] = "tv"
    erosionMm: float = 2.0


def parseEchoTimes(text):
    """Echo times in seconds from "0.004, 0.008" (the library refuses values that look like milliseconds)."""
    try:
        return [float(t) for t in text.replace(";", ",").split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"echo times {text!r}: expected seconds separated by commas, e.g. 0.015") from None


class QSMReconstructionWidget(PanelWidget):
    moduleName = "QSMReconstruction"
    parameterNodeClass = QSMReconstructionParameterNode

    def setupPanel(self):
        self.ui.sampleDataButton.connect("clicked(bool)", self.onSampleData)

    def onSampleData(self):
        self.getLogic()
        from ALSQuantCommonLib import sample

        with slicer.util.tryWithErrorDisplay("Could not build the sample subject.", waitCursor=True):
            subject = sample.loadSampleSubject(slicer.mrmlScene)
            p = self._parameterNode
            p.magnitudeVolume, p.phaseVolume = subject.magnitude[0], subject.phase[0]
            p.echoTimes = ", ".join(str(t) for t in subject.echoTimes)
            p.fieldStrength = subject.fieldStrength

    def onApplyButton(self):
        logic = self.getLogic()
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("QSM reconstruction could not start.", waitCursor=True):
            job = logic.startBackground(
                p.magnitudeVolume, p.phaseVolume, parseEchoTimes(p.echoTimes), p.fieldStrength, maskNode=p.maskVolume,
                unwrap=p.unwrap, background=p.background, inversion=p.inversion, erosionMm=p.erosionMm,
            )  # fmt: skip
            self.monitor.start(job, lambda outputs: slicer.util.setSliceViewerLayers(background=outputs["susceptibility"], fit=True))


class QSMReconstructionTest(ScriptedLoadableModuleTest):
    """Inside Slicer: a simulated subject's GRE nodes through the logic; the susceptibility's geometry and range."""

    def runTest(self):
        slicer.mrmlScene.Clear()
        self.test_QSMReconstruction_phantom()

    def test_QSMReconstruction_phantom(self):
        import numpy as np
        from ALSQuantCommon import ensureDependencies

        ensureDependencies()
        from ALSQuantCommonLib import nodes, sample
        from QSMReconstructionLib.logic import QSMReconstructionLogic

        subject = sample.loadSampleSubject(slicer.mrmlScene)
        out = QSMReconstructionLogic().run(subject.magnitude, subject.phase, subject.echoTimes, subject.fieldStrength)
        chi, affine = nodes.imageFromVolume(out["susceptibility"])
        np.testing.assert_allclose(affine, nodes.ijkToRas(subject.phase[0]))
        self.assertLess(float(np.abs(chi).max()), 2.0)
        self.delayDisplay("QSM Reconstruction test passed")
