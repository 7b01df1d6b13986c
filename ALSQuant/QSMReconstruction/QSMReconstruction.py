"""QSM Reconstruction: magnetic susceptibility (ppm) from GRE magnitude and phase nodes."""

import slicer
from slicer import vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleTest

from ALSQuantCommon import PanelWidget, ensureDependencies, helpText
from ALSQuantCommonLib.parameters import optionsFrom, withOptions
from ALSQuantLib.qsm import QSMOptions

# The logic runs the step as an `alsquant qsm` command; ALSQuantLib's heavier packages are installed on Apply.


class QSMReconstruction(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("QSM Reconstruction")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "ALSQuant")]
        self.parent.dependencies = ["ALSQuantCommon"]
        self.parent.contributors = ["ALSQuant developers"]
        self.parent.helpText = helpText(
            _(
                "Quantitative susceptibility mapping from a (single- or multi-echo) 3D GRE: phase scaling, unwrapping, "
                "brain mask, background-field removal, dipole inversion. The B0 direction comes from the volumes' "
                "geometry."
            ),
            "qsm-reconstruction",
        )
        self.parent.acknowledgementText = _("Runs in a background process.")


@parameterNodeWrapper
@withOptions(QSMOptions)
class QSMReconstructionParameterNode:
    """The panel's inputs (magnitude and phase, or real and imaginary parts) and acquisition; the chain's options
    (phase units, sign, chopping, unwrap, background, inversion, maskErosionMm, reference) come from QSMOptions."""

    magnitudeVolume: vtkMRMLScalarVolumeNode
    phaseVolume: vtkMRMLScalarVolumeNode
    realVolume: vtkMRMLScalarVolumeNode
    imaginaryVolume: vtkMRMLScalarVolumeNode
    maskVolume: vtkMRMLLabelMapVolumeNode
    echoTimes: str = "0.015"
    fieldStrength: float = 3.0


class QSMReconstructionWidget(PanelWidget):
    moduleName = "QSMReconstruction"
    parameterNodeClass = QSMReconstructionParameterNode
    requiredInputs = {
        ("magnitudeVolume", "realVolume"): _("Select the GRE magnitude (or its real part)."),
        ("phaseVolume", "imaginaryVolume"): _("Select the GRE phase (or its imaginary part)."),
    }

    def setupPanel(self):
        self.ui.sampleDataButton.connect("clicked(bool)", self.onSampleData)

    def onSampleData(self):
        ensureDependencies()
        from ALSQuantCommonLib import sample

        with slicer.util.tryWithErrorDisplay(_("Could not build the sample subject."), waitCursor=True):
            subject = sample.loadSampleSubject(slicer.mrmlScene)
            p = self._parameterNode
            p.magnitudeVolume, p.phaseVolume = subject.magnitude[0], subject.phase[0]
            p.echoTimes = ", ".join(str(t) for t in subject.echoTimes)
            p.fieldStrength = subject.fieldStrength

    def onApplyButton(self):
        ensureDependencies()
        from QSMReconstructionLib.logic import parseEchoTimes

        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("QSM reconstruction could not start."), waitCursor=True):
            complexParts = p.realVolume is not None and p.magnitudeVolume is None
            job = self.logic.process(
                None if complexParts else p.magnitudeVolume,
                None if complexParts else p.phaseVolume,
                parseEchoTimes(p.echoTimes),
                p.fieldStrength,
                optionsFrom(p),
                realNodes=p.realVolume if complexParts else None,
                imaginaryNodes=p.imaginaryVolume if complexParts else None,
                maskNode=p.maskVolume,
                wait=False,
            )
            self.monitor.start(
                job, lambda outputs: slicer.util.setSliceViewerLayers(background=outputs["susceptibility"], fit=True)
            )


class QSMReconstructionTest(ScriptedLoadableModuleTest):
    """Inside Slicer: a simulated subject's GRE nodes through the logic; the susceptibility's geometry and range."""

    def runTest(self):
        slicer.mrmlScene.Clear()
        self.test_QSMReconstruction_phantom()

    def test_QSMReconstruction_phantom(self):
        import numpy as np

        ensureDependencies()
        from ALSQuantCommonLib import nodes, sample
        from QSMReconstructionLib.logic import QSMReconstructionLogic

        subject = sample.loadSampleSubject(slicer.mrmlScene)
        out = QSMReconstructionLogic().process(
            subject.magnitude, subject.phase, subject.echoTimes, subject.fieldStrength
        )
        chi, affine = nodes.imageFromVolume(out["susceptibility"])
        np.testing.assert_allclose(affine, nodes.ijkToRas(subject.phase[0]))
        self.assertLess(float(np.abs(chi).max()), 2.0)
        self.delayDisplay("QSM Reconstruction test passed")
