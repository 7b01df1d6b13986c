"""ALSQuant common: a hidden module holding what the four panels share. Its Qt-free parts live in
``ALSQuantCommonLib`` (node conversion, background processes, dependencies, sample data); this file adds the small
Qt piece every panel uses to follow a background job."""

import qt
import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleTest

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
            self.logWidget.appendPlainText("Cancelled.")
            return
        with slicer.util.tryWithErrorDisplay("ALSQuant: the computation failed.", waitCursor=True):
            outputs = job.finish()
            self.progressBar.setValue(100)
            if self.onDone:
                self.onDone(outputs)


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
