"""Atlas Labeling: atlas regions brought into the subject's space by ANTs, and the maps measured in them."""

import slicer
from slicer import vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleTest

from ALSQuantCommon import PanelWidget, ensureDependencies, helpText
from ALSQuantCommonLib.parameters import optionsFrom, withOptions
from ALSQuantLib.atlas.labeling import LabelingOptions

# The logic runs the step as an `alsquant label` command; antspyx and the others are installed on Apply.


class AtlasLabeling(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Atlas Labeling")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "ALSQuant")]
        self.parent.dependencies = ["ALSQuantCommon"]
        self.parent.contributors = ["ALSQuant developers"]
        self.parent.helpText = helpText(
            _(
                "Registers the subject's FA to an atlas template (ANTs rigid, affine, SyN), brings the atlas labels "
                "back through the inverse transform, and measures MK, FA, MD in the CST and susceptibility in M1."
            ),
            "atlas-labeling",
        )
        self.parent.acknowledgementText = _("Registration by ANTs (antspyx); runs in a background process.")


@parameterNodeWrapper
@withOptions(LabelingOptions)
class AtlasLabelingParameterNode:
    """The panel's volumes; the labelling's options come from LabelingOptions, one parameter per field (camelCase:
    atlas, registrationMm, biasCorrection, ...)."""

    referenceVolume: vtkMRMLScalarVolumeNode
    greMagnitudeVolume: vtkMRMLScalarVolumeNode
    mkVolume: vtkMRMLScalarVolumeNode
    faVolume: vtkMRMLScalarVolumeNode
    mdVolume: vtkMRMLScalarVolumeNode
    msVolume: vtkMRMLScalarVolumeNode


def mapNodesOf(parameterNode):
    """The maps chosen in the panel: name → node."""
    chosen = {
        "mk": parameterNode.mkVolume,
        "fa": parameterNode.faVolume,
        "md": parameterNode.mdVolume,
        "ms": parameterNode.msVolume,
    }
    return {name: node for name, node in chosen.items() if node is not None}


class AtlasLabelingWidget(PanelWidget):
    moduleName = "AtlasLabeling"
    parameterNodeClass = AtlasLabelingParameterNode
    requiredInputs = {"referenceVolume": _("Select the subject's reference (FA).")}

    def onApplyButton(self):
        ensureDependencies()
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Atlas labelling could not start."), waitCursor=True):
            job = self.logic.process(
                p.referenceVolume,
                optionsFrom(p),
                mapNodes=mapNodesOf(p),
                greMagnitudeNode=p.greMagnitudeVolume,
                wait=False,
            )
            self.monitor.start(job, self.showResult)

    def showResult(self, outputs):
        slicer.util.setSliceViewerLayers(
            background=self._parameterNode.referenceVolume, label=outputs["labels"], fit=True
        )
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

        ensureDependencies()
        from ALSQuantCommonLib import nodes, sample
        from ALSQuantLib import phantom
        from AtlasLabelingLib.logic import AtlasLabelingLogic

        subject = sample.loadSampleSubject(slicer.mrmlScene)
        fa = nodes.volumeFromImage(slicer.mrmlScene, subject.truth.truth_dwi["fa"], nodes.ijkToRas(subject.dwi), "FA")
        with tempfile.TemporaryDirectory() as folder:
            phantom.write_template(folder, phantom.PhantomConfig())
            options = LabelingOptions(atlas="phantom", atlas_dir=f"{folder}/{phantom.TRUTH_DIR}/template")
            out = AtlasLabelingLogic().process(fa, options, mapNodes={"fa": fa})
        labels, _ = nodes.imageFromVolume(out["labels"])
        truth = subject.truth.truth_dwi["label"]
        cst, true_cst = np.isin(labels, phantom.REGIONS["CST"]), np.isin(truth, phantom.REGIONS["CST"])
        self.assertGreater(2 * (cst & true_cst).sum() / (cst.sum() + true_cst.sum()), 0.7)
        self.delayDisplay("Atlas Labeling test passed")
