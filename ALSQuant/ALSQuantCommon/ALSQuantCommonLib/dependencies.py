"""The Python packages ALSQuant needs inside Slicer, installed on first use (never at import).

Slicer's own numpy, SimpleITK and vtk are never replaced, and antspyx may not downgrade scipy: the installed
versions of these are pinned in a constraints file handed to the installer.
"""

import importlib.util
import re
import tempfile
from importlib import metadata
from pathlib import Path

REQUIREMENTS_FILE = Path(__file__).resolve().parents[1] / "Resources" / "requirements.txt"
"""The one list of requirements (it matches pyproject.toml's dependencies)."""


def readRequirements(path=REQUIREMENTS_FILE):
    """Import name → requirement, from a requirements file whose lines may end in ``# import: NAME``."""
    requirements = {}
    for line in Path(path).read_text().splitlines():
        requirement, _, comment = line.partition("#")
        requirement = requirement.strip()
        if not requirement:
            continue
        module = comment.split("import:", 1)[1].strip() if "import:" in comment else None
        name = re.split(r"[<>=!~ \[]", requirement, maxsplit=1)[0]
        requirements[module or name] = requirement
    return requirements


REQUIREMENTS = readRequirements()
"""Import name → requirement."""
PROTECTED = ("numpy", "scipy", "SimpleITK", "vtk")
"""Distributions pinned at their installed versions during installation."""


def missingRequirements():
    """Requirements whose module cannot be imported here."""
    return [req for module, req in REQUIREMENTS.items() if importlib.util.find_spec(module) is None]


def constraints():
    """``name==version`` for each installed protected distribution."""
    pins = []
    for name in PROTECTED:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return pins


def writeConstraints(folder=None):
    path = Path(folder or tempfile.mkdtemp(prefix="alsquant-pip-")) / "constraints.txt"
    path.write_text("\n".join(constraints()) + "\n")
    return path


def ensureDependencies(slicerModule, *, confirm=None):
    """Install what is missing. Returns the requirements installed (empty when nothing was missing).

    Parameters
    ----------
    slicerModule : module
        The ``slicer`` package: its ``packaging.pip_ensure`` (or ``pydeps.pip_ensure``) is used where this Slicer
        has it; else ``util.pip_install`` after `confirm`.
    confirm : callable(str) → bool, optional
        Asks the user before installing with ``pip_install`` (default: Slicer's OK/Cancel dialog).
    """
    missing = missingRequirements()
    if not missing:
        return []
    constraintsPath = writeConstraints()
    for holder in ("packaging", "pydeps"):
        ensure = getattr(getattr(slicerModule, holder, None), "pip_ensure", None)
        if ensure is not None:
            from packaging.requirements import Requirement

            ensure([Requirement(r) for r in missing], constraints=str(constraintsPath), requester="ALSQuant")
            return missing
    confirm = confirm or (lambda text: slicerModule.util.confirmOkCancelDisplay(text))
    if not confirm(
        f"ALSQuant needs these Python packages, which will be downloaded and installed:\n{', '.join(missing)}"
    ):
        raise RuntimeError(f"ALSQuant cannot run without: {', '.join(missing)}")
    slicerModule.util.pip_install(["-c", str(constraintsPath), *missing])
    return missing
