"""Provenance that travels with every output: parameters, input checksums, software versions."""

import dataclasses
import datetime
import hashlib
import platform
import sys
from importlib import metadata
from pathlib import Path

from . import __version__

_PACKAGES = ("numpy", "scipy", "nibabel", "dipy", "SimpleITK", "antspyx", "scikit-learn", "pynrrd")


def file_sha256(path, chunk=1 << 20):
    """SHA-256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def versions():
    """Versions of ALSQuant, Python and the installed scientific dependencies."""
    found = {"alsquant": __version__, "python": sys.version.split()[0], "platform": platform.platform()}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def record(step, *, options, inputs, outputs=(), arguments=None, results=None):
    """A step's provenance record.

    Parameters
    ----------
    step : str
        What was done ("dki", "qsm", "label").
    options : dataclass instance
        The step's options (`ALSQuantLib.options`): recorded as ``dataclasses.asdict(options)``.
    inputs : dict
        Name → path of each input file; each gets its SHA-256.
    outputs : iterable of path
        As they should be recorded (the workflows give them relative to the step's folder).
    arguments : dict, optional
        Other values given to the step that shape its result (echo times given by hand, the maps asked for).
    results : dict, optional
        What the step found or measured (counts, timings): recorded, but not part of what it was asked to do.
    """
    return {
        "step": step,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "options": dataclasses.asdict(options),
        "arguments": arguments or {},
        "inputs": {name: {"path": str(Path(p).resolve()), "sha256": file_sha256(p)} for name, p in inputs.items()},
        "outputs": [str(p) for p in outputs],
        "results": results or {},
        "versions": versions(),
    }
