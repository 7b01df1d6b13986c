"""ALS Classification: ROC analysis of a cohort's markers, and the diagnosis of the current subject."""

import pathlib

import slicer
from slicer import vtkMRMLTableNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleTest

from ALSQuantCommon import PanelWidget, ensureDependencies, helpText

# ALSClassificationLib.logic imports ALSQuantLib and scikit-learn, installed on first use: imported when needed.


class ALSClassification(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("ALS Classification")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "ALSQuant")]
        self.parent.dependencies = ["ALSQuantCommon"]
        self.parent.contributors = ["ALSQuant developers"]
        self.parent.helpText = helpText(
            _(
                "Group statistics and ROC analysis (DeLong CIs, Youden cut-offs, cross-validated combinations) of a "
                "cohort table, a diagnostic model saved as JSON, and the diagnosis of one subject."
            ),
            "als-classification",
        )
        self.parent.acknowledgementText = _("Statistics checked against R's pROC.")


@parameterNodeWrapper
class ALSClassificationParameterNode:
    cohortTable: vtkMRMLTableNode
    markers: str = "cst_mk,cst_md,cst_fa,m1_ms"
    combinations: str = "cst_mk+m1_ms"
    positive: str = "ALS"
    covariates: str = ""
    modelPath: pathlib.Path
    subjectTable: vtkMRMLTableNode


def splitList(text, separator=","):
    return [item.strip() for item in text.split(separator) if item.strip()]


class ALSClassificationWidget(PanelWidget):
    moduleName = "ALSClassification"
    parameterNodeClass = ALSClassificationParameterNode
    requiredInputs = {"cohortTable": _("Select the cohort table (load cohort.csv as a table).")}

    def setupPanel(self):
        self.ui.cancelButton.visible = False  # the analysis takes seconds: no background process
        self.ui.saveModelButton.connect("clicked(bool)", self.onSaveModel)
        self.ui.diagnoseButton.connect("clicked(bool)", self.onDiagnose)

    def onApplyButton(self):
        ensureDependencies()
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("The ROC analysis failed."), waitCursor=True):
            out = self.logic.analyze(
                p.cohortTable,
                splitList(p.markers),
                combinations=splitList(p.combinations),
                positive=p.positive,
                covariates=splitList(p.covariates),
            )
            from ALSQuantLib.stats import auc_text

            results = out["results"]
            for name, r in (results["markers"] | results["combinations"]).items():
                self.ui.logText.appendPlainText(f"{name}: {auc_text(r)}")
            adjusted = results.get("adjusted", {})
            for name, r in (adjusted.get("markers", {}) | adjusted.get("combinations", {})).items():
                covariates = ", ".join(adjusted["covariates"])
                self.ui.logText.appendPlainText(f"{name} adjusted for {covariates}: {auc_text(r)}")
            slicer.app.layoutManager().setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpPlotTableView)
            slicer.modules.plots.logic().ShowChartInLayout(out["chart"])

    def onSaveModel(self):
        p = self._parameterNode
        combinations = splitList(p.combinations)
        markers = combinations[0].split("+") if combinations else splitList(p.markers)
        ensureDependencies()
        with slicer.util.tryWithErrorDisplay(_("Could not save the model."), waitCursor=True):
            self.logic.saveModel(
                p.cohortTable, markers, p.modelPath, positive=p.positive, covariates=splitList(p.covariates)
            )
            message = _("model of {markers} saved to {path}").format(markers="+".join(markers), path=p.modelPath)
            self.ui.logText.appendPlainText(message)

    def onDiagnose(self):
        p = self._parameterNode
        ensureDependencies()
        with slicer.util.tryWithErrorDisplay(_("Could not diagnose the subject."), waitCursor=True):
            result = self.logic.classify(p.modelPath, p.subjectTable)
            flags = (
                f" (outside the training range: {', '.join(result['out_of_range'])})" if result["out_of_range"] else ""
            )
            self.ui.logText.appendPlainText(f"P(ALS) = {result['probability']:.3f} -> {result['decision']}{flags}")


class ALSClassificationTest(ScriptedLoadableModuleTest):
    """Inside Slicer: a simulated cohort table through the analysis; one ROC series per marker and combination."""

    def runTest(self):
        slicer.mrmlScene.Clear()
        self.test_ALSClassification_cohort()

    def test_ALSClassification_cohort(self):
        import numpy as np

        ensureDependencies()
        from ALSClassificationLib.logic import ALSClassificationLogic
        from ALSQuantCommonLib import nodes
        from ALSQuantLib import phantom

        rng = np.random.default_rng(0)
        rows = []
        for n, group in enumerate(["ALS"] * 20 + ["control"] * 20):
            values = phantom.draw_subject_values(group, rng)
            rows.append(
                {
                    "participant_id": f"sub-{n:02d}",
                    "group": group,
                    "cst_mk": values["cst_mk"],
                    "m1_ms": values["m1_chi"],
                }
            )
        table = nodes.tableFromRows(slicer.mrmlScene, rows, "cohort")
        out = ALSClassificationLogic().analyze(table, ["cst_mk", "m1_ms"], combinations=["cst_mk+m1_ms"])
        self.assertEqual(out["chart"].GetNumberOfPlotSeriesNodes(), 3)
        self.assertGreater(out["results"]["markers"]["cst_mk"]["auc"], 0.7)
        self.delayDisplay("ALS Classification test passed")
