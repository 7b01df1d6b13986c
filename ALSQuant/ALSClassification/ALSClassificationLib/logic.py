"""ALS Classification logic: a cohort table in; group statistics, ROC tables and curves (plot series on a chart), a
diagnostic model (JSON), and the diagnosis of one subject from a saved model out."""

import numpy as np
import slicer

from ALSQuantCommonLib import nodes
from ALSQuantCommonLib.logic import ScriptedLoadableModuleLogic
from ALSQuantLib import io, pipeline, stats

STUDY_MARKERS = ("cst_mk", "cst_md", "cst_fa", "m1_ms")


class ALSClassificationLogic(ScriptedLoadableModuleLogic):
    """ROC analysis of a cohort (`ALSQuantLib.stats`, checked against R's pROC) and individual diagnosis. It runs
    in Slicer's process: the analysis takes seconds."""

    def __init__(self, scene=None):
        ScriptedLoadableModuleLogic.__init__(self)
        self.scene = scene or slicer.mrmlScene

    def readCohort(self, cohort, markers, positive, groupColumn, subjectColumn, covariates=()):
        """`stats.Cohort` of `markers` (and `covariates`) from a table node or a CSV/TSV file."""
        return stats.read_cohort(
            self.cohortRows(cohort),
            markers=list(markers),
            group_column=groupColumn,
            positive=positive,
            subject_column=subjectColumn,
            covariates=list(covariates),
        )

    @staticmethod
    def cohortRows(cohort):
        """Rows of a table node, or of a CSV/TSV file."""
        if hasattr(cohort, "GetTable"):
            return nodes.rowsFromTable(cohort)
        return io.read_table(cohort)

    def analyze(
        self,
        cohort,
        markers=STUDY_MARKERS,
        *,
        combinations=("cst_mk+m1_ms",),
        positive="ALS",
        groupColumn="group",
        subjectColumn="participant_id",
        penalty="none",
        covariates=(),
        seed=0,
    ):
        """Run the analysis and make its nodes (`penalty`: how markers are combined, `stats.PENALTIES`; with
        `covariates`, e.g. ``("age", "sex")``, also adjusted for them: ``results["adjusted"]``).

        Returns
        -------
        dict
            ``results`` (as `stats.analyze`), ``markerTable`` and ``combinationTable`` (table nodes), ``curves``
            (name → table node with 1 − specificity and sensitivity), ``chart`` (plot chart node with one series
            per ROC curve).
        """
        table = self.readCohort(cohort, markers, positive, groupColumn, subjectColumn, covariates)
        results, rocs, _ = stats.analyze(table, list(combinations), penalty=penalty, random_seed=seed)
        markerRows = [
            {"marker": m, **{k: v for k, v in r.items() if not isinstance(v, (list, tuple))}}
            for m, r in results["markers"].items()
        ]
        combinationRows = [
            {"combination": c, **{k: v for k, v in r.items() if not isinstance(v, (list, tuple, dict))}}
            for c, r in results["combinations"].items()
        ]
        out = {
            "results": results,
            "markerTable": nodes.tableFromRows(self.scene, markerRows, "ALSQuant_ROC_markers"),
            "combinationTable": nodes.tableFromRows(self.scene, combinationRows, "ALSQuant_ROC_combinations")
            if combinationRows
            else None,
            "curves": {},
        }
        chart = self.scene.AddNewNodeByClass("vtkMRMLPlotChartNode", self.scene.GenerateUniqueName("ALSQuant_ROC"))
        chart.SetTitle("ROC curves")
        chart.SetXAxisTitle("1 - specificity")
        chart.SetYAxisTitle("sensitivity")
        for roc in rocs:
            fpr = 1.0 - np.asarray(roc.curve["specificity"], dtype=float)
            tpr = np.asarray(roc.curve["sensitivity"], dtype=float)
            order = np.lexsort((tpr, fpr))  # from (0, 0) to (1, 1)
            fpr, tpr = fpr[order], tpr[order]
            curve = nodes.tableFromRows(
                self.scene, [{"fpr": float(a), "tpr": float(b)} for a, b in zip(fpr, tpr)], f"ALSQuant_ROC_{roc.name}"
            )
            series = self.scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{roc.name} (AUC {roc.auc:.2f})")
            series.SetAndObserveTableNodeID(curve.GetID())
            series.SetXColumnName("fpr")
            series.SetYColumnName("tpr")
            series.SetPlotType(series.PlotTypeScatter)
            series.SetMarkerStyle(series.MarkerStyleNone)
            chart.AddAndObservePlotSeriesNodeID(series.GetID())
            out["curves"][roc.name] = curve
        out["chart"] = chart
        return out

    def saveModel(
        self,
        cohort,
        markers,
        path,
        *,
        positive="ALS",
        groupColumn="group",
        subjectColumn="participant_id",
        penalty="none",
        covariates=(),
    ):
        """Fit the diagnostic model of `markers` on the cohort (`penalty`: `stats.PENALTIES`; adjusted for
        `covariates` if given, and then `classify` needs them) and save it as JSON; return the model."""
        table = self.readCohort(cohort, markers, positive, groupColumn, subjectColumn, covariates)
        model = stats.diagnostic_model(table, list(markers), penalty=penalty, adjust=bool(covariates))
        stats.save_model(model, path)
        return model

    def classify(self, modelPath, values):
        """Diagnose one subject from a saved model. `values`: marker → value; or a table node, either Atlas
        Labeling's ROI statistics (a ``region`` column: reduced to the study's markers as ``run-subject`` does,
        `pipeline.markers_from_rows`) or one whose first row holds the markers. Returns `stats.classify`'s result
        with a table node."""
        model = stats.load_model(modelPath)
        if hasattr(values, "GetTable"):
            rows = nodes.rowsFromTable(values)
            row = pipeline.markers_from_rows(rows) if rows and "region" in rows[0] else rows[0]
            covariates = model.get("adjustment", {}).get("covariates", [])
            values = {m: float(row[m]) for m in model["markers"] if row.get(m, "") != ""}
            values.update({c: row[c] for c in covariates if row.get(c, "") != ""})
        result = stats.classify(model, values)
        rows = [{"marker": m, "value": float(values[m]), "z_score": float(z)} for m, z in result["z_scores"].items()]
        result["table"] = nodes.tableFromRows(self.scene, rows, "ALSQuant_diagnosis")
        return result
