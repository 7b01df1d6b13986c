"""Provenance that travels with every output: parameters, input checksums, software versions."""

import datetime
import hashlib
import platform
import sys
from importlib import metadata
from pathlib import Path

from . import __version__, io

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


def record(step, *, parameters, inputs, outputs=(), details=None):
    """A provenance record.

    Parameters
    ----------
    step : str
        What was done ("dki", "qsm", ...).
    parameters : dict
        Every option that shaped the result.
    inputs : dict
        Name → path of each input file; each gets its SHA-256.
    outputs : iterable of path
    details : dict, optional
        What the step found or measured (counts, timings): recorded, but not part of its parameters.
    """
    return {
        "step": step,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "parameters": parameters,
        "inputs": {name: {"path": str(Path(p).resolve()), "sha256": file_sha256(p)} for name, p in inputs.items()},
        "outputs": [str(Path(p).name) for p in outputs],
        "details": details or {},
        "versions": versions(),
    }


def write(path, step, *, parameters, inputs, outputs=(), details=None):
    """Write a provenance record (`record`) as JSON, atomically; return the record."""
    rec = record(step, parameters=parameters, inputs=inputs, outputs=outputs, details=details)
    io.write_json(path, rec)
    return rec
