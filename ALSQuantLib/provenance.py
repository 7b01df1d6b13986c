"""Provenance that travels with every output: parameters, input checksums, software versions."""

import dataclasses
import datetime
import hashlib
import os
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


def checksums(paths):
    """Name → ``{"path": absolute path, "sha256": ...}`` for each file of `paths` (name → path)."""
    return {name: {"path": str(Path(p).resolve()), "sha256": file_sha256(p)} for name, p in paths.items()}


def output_entries(folder, paths):
    """``[{"path": relative to folder, "bytes": ..., "sha256": ...}]`` for the files a step wrote."""
    folder = Path(folder)
    return [
        {"path": os.path.relpath(p, folder), "bytes": Path(p).stat().st_size, "sha256": file_sha256(p)} for p in paths
    ]


def record(step, *, options, inputs, outputs=(), arguments=None, results=None):
    """A step's provenance record.

    Parameters
    ----------
    step : str
        What was done ("dki", "qsm", "label").
    options : dataclass instance
        The step's options (`ALSQuantLib.options`): recorded as ``dataclasses.asdict(options)``.
    inputs : dict
        Name → ``{"path", "sha256"}`` of each input file (`checksums`, taken before the step read them).
    outputs : list of dict
        `output_entries` of the files written.
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
        "inputs": dict(inputs),
        "outputs": list(outputs),
        "results": results or {},
        "versions": versions(),
    }
