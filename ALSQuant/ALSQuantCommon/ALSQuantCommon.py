"""ALSQuant common: a hidden module holding what the four panels share. Its Qt-free parts live in
``ALSQuantCommonLib`` (node conversion, background processes, dependencies, sample data); this file adds the small
Qt piece every panel uses to follow a background job."""

import importlib

import qt
import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from ALSQuantCommonLib import dependencies


class ALSQuantCommon(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "ALSQuant Common"
        self.parent.categories = ["ALSQuant"]
        self.parent.dependencies = []
        self.parent.hidden = True
        self.parent.contributors = ["ALSQuant developers"]
        self.parent.helpText = "Shared code of the ALSQuant modules."
        self.parent.acknowledgementText = ""


def ensureDependencies():
    """Install missing Python packages on first use (asks first where Slicer has no pip_ensure)."""
    with slicer.util.tryWithErrorDisplay("Could not install the Python packages ALSQuant needs.", waitCursor=True):
        dependencies.ensureDependencies(slicer)


class JobMonitor:
    """Follows a `tasks.Job` from a timer: progress bar, log, Cancel button; loads the outputs when it succeeds.

    ``onDone(outputs)`` is called with the job's nodes; errors reach the user through ``tryWithErrorDisplay``.
    """

    def __init__(self, progressBar, logWidget, cancelButton, applyButton):
        self.progressBar, self.logWidget, self.cancelButton, self.applyButton = progressBar, logWidget, cancelButton, applyButton
        self.timer = qt.QTimer()
        self.timer.setInterval(250)
        self.timer.connect("timeout()", self._poll)
        self.cancelButton.connect("clicked(bool)", self.cancel)
        self.job = None
        self.onDone = None

    def start(self, job, onDone):
        self.job, self.onDone = job, onDone
        self.progressBar.setValue(0)
        self.logWidget.clear()
        self.cancelButton.enabled, self.applyButton.enabled = True, False
        self.timer.start()

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
        self.cancelButton.enabled, self.applyButton.enabled = False, True
        job, self.job = self.job, None
        if job.task.cancelled:
            job.discard()
            self.logWidget.appendPlainText("Cancelled.")
            return
        with slicer.util.tryWithErrorDisplay("ALSQuant: the computation failed.", waitCursor=True):
            outputs = job.finish()
            self.progressBar.setValue(100)
            if self.onDone:
                self.onDone(outputs)


class PanelWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """What the four panels share: the .ui bound to the module's parameter node (``connectGui``), the scene
    observers, the job monitor, and the logic created on first use (after the dependencies are installed).

    A panel sets ``moduleName`` and ``parameterNodeClass``, and connects its own buttons in `setupPanel`.
    """

    moduleName = None
    parameterNodeClass = None

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
        self.monitor = JobMonitor(self.ui.progressBar, self.ui.logText, self.ui.cancelButton, self.ui.applyButton)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.setupPanel()
        self.initializeParameterNode()

    def setupPanel(self):
        """Connect the panel's own widgets (override)."""

    def onApplyButton(self):
        raise NotImplementedError

    def getLogic(self):
        """The module's logic (``<Module>Lib.logic.<Module>Logic``), imported once the dependencies are there."""
        if self.logic is None:
            ensureDependencies()
            module = importlib.import_module(f"{self.moduleName}Lib.logic")
            self.logic = getattr(module, f"{self.moduleName}Logic")()
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
        self.setParameterNode(self.parameterNodeClass(ScriptedLoadableModuleLogic().getParameterNode()))

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)


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
