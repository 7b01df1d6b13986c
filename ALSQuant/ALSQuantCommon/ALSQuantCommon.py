"""ALSQuant common: a hidden module holding what the four panels share. Its Qt-free parts live in
``ALSQuantCommonLib`` (node conversion, background processes, the logic base, parameter nodes, dependencies,
sample data); this file adds the Qt pieces every panel uses: the panel base and the job monitor."""

import importlib

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import findChildWidgetForParameter
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from ALSQuantCommonLib import dependencies, parameters

README_URL = "https://github.com/alsquant/ALSQuant/blob/main/README.md"


def helpText(text, section):
    """A module's help: `text`, then a link to its section of the README."""
    return f'{text} <a href="{README_URL}#{section}">{_("See the ALSQuant README.")}</a>'


class ALSQuantCommon(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("ALSQuant Common")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "ALSQuant")]
        self.parent.dependencies = []
        self.parent.hidden = True
        self.parent.contributors = ["ALSQuant developers"]
        self.parent.helpText = helpText(_("Shared code of the ALSQuant modules."), "slicer-modules")
        self.parent.acknowledgementText = ""


def ensureDependencies():
    """Install missing Python packages on first use (asks first where Slicer has no pip_ensure)."""
    with slicer.util.tryWithErrorDisplay(_("Could not install the Python packages ALSQuant needs."), waitCursor=True):
        dependencies.ensureDependencies(slicer)


class JobMonitor:
    """Follows a `tasks.Job` from a timer: progress bar, log, Cancel button; loads the outputs when it succeeds.

    ``onDone(outputs)`` is called with the job's nodes; errors reach the user through ``tryWithErrorDisplay``;
    ``onIdle()`` when the job has ended, whichever way.
    """

    def __init__(self, progressBar, logWidget, cancelButton, onIdle):
        self.progressBar, self.logWidget, self.cancelButton, self.onIdle = progressBar, logWidget, cancelButton, onIdle
        self.timer = qt.QTimer()
        self.timer.setInterval(250)
        self.timer.connect("timeout()", self._poll)
        self.cancelButton.connect("clicked(bool)", self.cancel)
        self.job = None
        self.onDone = None

    @property
    def busy(self):
        return self.job is not None

    def start(self, job, onDone):
        self.job, self.onDone = job, onDone
        self.progressBar.setValue(0)
        self.logWidget.clear()
        self.cancelButton.enabled = True
        self.timer.start()
        self.onIdle()

    def cancel(self):
        if self.job is not None:
            self.job.task.cancel()

    def _poll(self):
        for line in self.job.task.poll():
            self.logWidget.appendPlainText(line)
        self.progressBar.setValue(int(100 * self.job.task.progress))
        self.progressBar.setFormat(f"%p% {self.job.task.message}")
        if self.job.task.running:
            return
        self.timer.stop()
        self.cancelButton.enabled = False
        job, self.job = self.job, None
        try:
            if job.task.cancelled:
                job.discard()
                self.logWidget.appendPlainText(_("Cancelled."))
                return
            with slicer.util.tryWithErrorDisplay(_("ALSQuant: the computation failed."), waitCursor=True):
                outputs = job.finish()
                self.progressBar.setValue(100)
                if self.onDone:
                    self.onDone(outputs)
        finally:
            self.onIdle()


class PanelWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """What the four panels share: the .ui bound to the module logic's own parameter node (``connectGui``), Apply
    enabled only when the inputs are there (`_checkCanApply`), the scene observers, the job monitor, and option
    tooltips taken from the options' declaration.

    A panel sets ``moduleName``, ``parameterNodeClass`` and ``requiredInputs`` (parameter name, or a tuple of
    alternatives, → what to select),
    and connects its own buttons in `setupPanel`.
    """

    moduleName = None
    parameterNodeClass = None
    requiredInputs = {}

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath(f"UI/{self.moduleName}.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        # The logic imports only numpy and scipy, which Slicer has: the other packages are installed on Apply.
        module = importlib.import_module(f"{self.moduleName}Lib.logic")
        self.logic = getattr(module, f"{self.moduleName}Logic")()
        self.monitor = JobMonitor(self.ui.progressBar, self.ui.logText, self.ui.cancelButton, self._checkCanApply)
        optionsClass = getattr(self.parameterNodeClass, "optionsClass", None)
        for name, text in (parameters.toolTips(optionsClass) if optionsClass else {}).items():
            widget = findChildWidgetForParameter(uiWidget, name)
            if widget is not None:
                widget.toolTip = text
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.setupPanel()
        self.initializeParameterNode()

    def setupPanel(self):
        """Connect the panel's own widgets (override)."""

    def onApplyButton(self):
        raise NotImplementedError

    def cleanup(self):
        """Slicer closes the panel: stop its observers and any job under way."""
        self.removeObservers()
        if self.logic is not None:
            self.logic.cancel()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        """The module logic's own parameter node (tagged with the module's name), wrapped."""
        self.setParameterNode(self.parameterNodeClass(self.logic.getParameterNode()))

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None):
        """Apply is enabled only when every required input is selected and no job is running; its tooltip says
        what is missing."""
        if self.monitor.busy:
            self.ui.applyButton.enabled, self.ui.applyButton.toolTip = False, _("A computation is running.")
            return
        missing = [
            text
            for names, text in self.requiredInputs.items()
            if not any(
                getattr(self._parameterNode, name, None) for name in ((names,) if isinstance(names, str) else names)
            )
        ]
        self.ui.applyButton.enabled = self._parameterNode is not None and not missing
        self.ui.applyButton.toolTip = "; ".join(missing) if missing else _("Run the computation.")


class ALSQuantCommonTest(ScriptedLoadableModuleTest):
    def runTest(self):
        slicer.mrmlScene.Clear()
        self.test_sample_subject_round_trip()

    def test_sample_subject_round_trip(self):
        from ALSQuantCommonLib import nodes, sample

        subject = sample.loadSampleSubject(slicer.mrmlScene)
        dwi = nodes.dwiFromNode(subject.dwi)
        self.assertEqual(dwi.data.shape, subject.truth.dwi.data.shape)
        self.assertLess(abs(dwi.bvecs - subject.truth.dwi.bvecs).max(), 1e-6)
        self.delayDisplay("ALSQuant common test passed")
