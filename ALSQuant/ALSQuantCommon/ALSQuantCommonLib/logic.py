"""What the four modules' logic classes share: the parameter node each owns, and one compute path.

Each module's logic is ``<Module>Logic(ScriptedLoadableModuleLogic)``, as in Slicer's scripted-module template: its
parameter node is the scene's singleton ``vtkMRMLScriptedModuleNode`` tagged with the module's name (the class name
without "Logic"), so two modules never share one. Inside Slicer the base class is Slicer's own. The ``slicer-core``
wheel the tests run on has MRML but not Slicer's scripted-module classes (their file imports Qt): there
`ScriptedLoadableModuleLogic` below does what Slicer's does for the parameter node (the same singleton tag, the same
``ModuleName`` attribute), and nothing else.

A step runs as an ``alsquant`` command in another process (`tasks.BackgroundTask`): the same step function as the
command line and the pipeline (``ALSQuantLib.workflows``), and Slicer never freezes. ``wait=True`` (scripting)
blocks until the nodes are made; ``wait=False`` (the panel) returns the `tasks.Job` for the panel to follow.
"""

import tempfile
from pathlib import Path

import slicer

from . import tasks

try:
    from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic
except ImportError:  # outside Slicer (slicer-core): the parameter-node part of Slicer's class

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            self.moduleName = self.__class__.__name__.removesuffix("Logic")
            self.isSingletonParameterNode = True

        def getParameterNode(self):
            """The module's singleton parameter node in ``slicer.mrmlScene``, made on first use."""
            node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if node:
                if node.GetAttribute("ModuleName") != self.moduleName:
                    node.SetAttribute("ModuleName", self.moduleName)
                return node
            return slicer.mrmlScene.AddNode(self.createParameterNode())

        def createParameterNode(self):
            node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
            node.UnRegister(None)
            node.SetSingletonTag(self.moduleName)
            node.SetAttribute("ModuleName", self.moduleName)
            node.SetName(slicer.mrmlScene.GenerateUniqueName(self.moduleName))
            return node


class StepLogic(ScriptedLoadableModuleLogic):
    """A module logic whose work runs as an ``alsquant`` command; `cancel` stops the job under way."""

    def __init__(self, scene=None):
        ScriptedLoadableModuleLogic.__init__(self)
        self.scene = scene or slicer.mrmlScene
        self.job = None

    @staticmethod
    def workFolder(prefix, workdir=None):
        """The folder for a job's input copies and outputs: `workdir`, kept, or a temporary one, deleted when the
        job is finished or cancelled."""
        if workdir:
            Path(workdir).mkdir(parents=True, exist_ok=True)
            return Path(workdir), None
        folder = Path(tempfile.mkdtemp(prefix=f"alsquant-{prefix}-"))
        return folder, folder

    def run(self, arguments, load, temporary, *, wait):
        """Start ``alsquant <arguments>``; with `wait`, block and return `load()`'s nodes, else return the job."""
        self.job = tasks.Job(tasks.BackgroundTask(arguments).start(), load, temporary=temporary)
        if not wait:
            return self.job
        self.job.task.wait()
        return self.job.finish()

    def cancel(self):
        """Stop the job under way, if any (the panel's Cancel, and its cleanup when Slicer closes it)."""
        if self.job is not None and self.job.task.running:
            self.job.task.cancel()
            self.job.discard()
