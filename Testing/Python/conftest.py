"""Shared fixtures: the real data beside the project, and a real MRML scene from slicer-core."""

import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"
MODULES_DIR = PROJECT_ROOT / "ALSQuant"
MODULE_NAMES = ("ALSQuantCommon", "DKIReconstruction", "QSMReconstruction", "AtlasLabeling", "ALSClassification")


@pytest.fixture
def shared_data():
    """``../shared/data``; tests that need it skip when it is absent (a fresh machine has only the project)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture
def module_logic():
    """The Slicer modules' Qt-free packages (ALSQuantCommonLib, <Module>Lib) importable, as inside Slicer where every
    module's folder is on the path."""
    pytest.importorskip("slicer")
    for name in MODULE_NAMES:
        if str(MODULES_DIR / name) not in sys.path:
            sys.path.append(str(MODULES_DIR / name))
    return MODULES_DIR


@pytest.fixture
def mrml_scene():
    """A real vtkMRMLScene (slicer-core), installed as ``slicer.mrmlScene`` for the duration of a test."""
    slicer = pytest.importorskip("slicer")
    scene = slicer.vtkMRMLScene()
    previous = getattr(slicer, "mrmlScene", None)
    slicer.mrmlScene = scene
    yield scene
    scene.Clear(1)
    slicer.mrmlScene = previous


def child_processes(pid):
    """Process ids whose parent is `pid` (from /proc; an empty list where there is none)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found
