"""Long work in a separate process, so that Slicer never freezes.

A `BackgroundTask` runs ``python -m ALSQuantLib.cli <command> ...`` (Slicer's own Python) and collects its output
lines on a reader thread; ``[ 42.0%] message`` lines set the progress. The widget polls it from a timer, shows the
progress and the log, and `cancel` stops the process and its children. The command's output files are then loaded
into nodes by the module's logic. Plain Python: tested headless.
"""

import contextlib
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading

_PROGRESS = re.compile(r"^\[\s*([\d.]+)%\]\s*(.*)$")


def pythonExecutable():
    """Slicer's Python launcher (``PythonSlicer``) when running inside Slicer, else this interpreter."""
    return shutil.which("PythonSlicer") or sys.executable


class BackgroundTask:
    """One ``alsquant`` command in its own process."""

    def __init__(self, arguments, *, environment=None):
        self.arguments = [str(a) for a in arguments]
        self.environment = {**os.environ, **(environment or {})}
        self.progress = 0.0
        self.message = ""
        self.log = []
        self._lines = queue.Queue()
        self._process = None
        self.cancelled = False

    def start(self):
        kwargs = (
            {"start_new_session": True}
            if os.name == "posix"
            else {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
        )
        self._process = subprocess.Popen(
            [pythonExecutable(), "-m", "ALSQuantLib.cli", *self.arguments],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env=self.environment,
            **kwargs,
        )
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self):
        for line in self._process.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def poll(self):
        """New output lines since the last call (progress and message updated from them)."""
        new = []
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                break
            if line is None:
                continue
            new.append(line)
            match = _PROGRESS.match(line)
            if match:
                self.progress, self.message = float(match.group(1)) / 100.0, match.group(2)
        self.log += new
        return new

    @property
    def running(self):
        return self._process is not None and self._process.poll() is None

    @property
    def returncode(self):
        return None if self._process is None else self._process.poll()

    def wait(self, timeout=None):
        """Block until the process ends (for scripts and tests; the GUI polls instead); return its exit code."""
        code = self._process.wait(timeout)
        self.poll()
        return code

    def cancel(self, grace=5.0):
        """Stop the process and everything it started: SIGTERM first, so that the command unwinds (its temporaries
        removed, its workers stopped), then, after `grace` seconds (a long native call such as an ANTs registration
        only returns to Python when done), SIGKILL."""
        if self.running:
            self.cancelled = True
            self._signal(signal.SIGTERM)
            try:
                self._process.wait(grace)
            except subprocess.TimeoutExpired:
                self._signal(getattr(signal, "SIGKILL", signal.SIGTERM))
                self._process.wait()

    def _signal(self, number):
        if os.name == "posix":
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, number)
        elif number == signal.SIGTERM:
            self._process.terminate()
        else:
            self._process.kill()

    def errorText(self):
        """The command's error message (its last lines), for the user."""
        return "\n".join(line for line in self.log[-5:] if line.strip()) or f"exit code {self.returncode}"


class Job:
    """A started `BackgroundTask`, how to turn its outputs into nodes once it has succeeded, and the temporary folder
    (inputs written for the command, its outputs) to delete once the nodes are made or the task has failed."""

    def __init__(self, task, load, temporary=None):
        self.task = task
        self._load = load
        self.temporary = temporary

    def finish(self):
        """Load the outputs (call when the task is no longer running); raise with the command's error otherwise.
        The temporary folder is deleted either way."""
        try:
            if self.task.cancelled:
                raise RuntimeError("cancelled")
            if self.task.returncode != 0:
                raise RuntimeError(f"alsquant {self.task.arguments[0]} failed:\n{self.task.errorText()}")
            return self._load()
        finally:
            self.discard()

    def discard(self):
        """Delete the temporary folder (a cancelled job's too)."""
        if self.temporary is not None:
            shutil.rmtree(self.temporary, ignore_errors=True)
            self.temporary = None
