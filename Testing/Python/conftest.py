"""Shared fixtures: the real data beside the project, and a real MRML scene from slicer-core."""

import sys
from pathlib import Path

import numpy as np
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


def fsl_layout(shared_data, folder):
    """An FSL installation's layout (``data/atlases``, ``data/standard``) made of the real files in ../shared, with
    FSL-style XML tables written from their index files; the MNI FA template stands in for FMRIB58."""
    atlases, standard = folder / "data" / "atlases", folder / "data" / "standard"
    for sub in ("JHU", "HarvardOxford"):
        (atlases / sub).mkdir(parents=True)
    standard.mkdir(parents=True)
    files = {
        "JHU/JHU-ICBM-tracts-maxprob-thr25-1mm.nii.gz": "jhu-icbm/JHU-ICBM-tracts-maxprob-thr25-1mm.nii.gz",
        "HarvardOxford/HarvardOxford-cort-maxprob-thr25-1mm.nii.gz": (
            "harvard-oxford/HarvardOxford-cort-maxprob-thr25-1mm.nii.gz"
        ),
    }
    for target, source in files.items():
        (atlases / target).symlink_to(shared_data / "atlases" / source)
    for xml, index in (
        ("JHU-tracts.xml", "jhu-icbm/JHU-tracts_index.txt"),
        ("HarvardOxford-Cortical.xml", "harvard-oxford/HarvardOxford-Cortical_index.txt"),
    ):
        names = (shared_data / "atlases" / index).read_text().splitlines()
        labels = "".join(f'<label index="{i}">{n.strip()}</label>' for i, n in enumerate(names) if n.strip())
        (atlases / xml).write_text(f"<atlas><data>{labels}</data></atlas>")
    (standard / "MNI152_T1_1mm_brain.nii.gz").symlink_to(
        shared_data / "templates" / "MNI152NLin6_res-1x1x1_T1w_descr-brain.nii.gz"
    )
    (standard / "FMRIB58_FA_1mm.nii.gz").symlink_to(shared_data / "templates" / "MNI_FA_template_1.25mm.nii.gz")
    return folder


def random_rotation(rng):
    """A uniformly random rotation matrix."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def write_nrrd_in_frame(dwi, path, frame):
    """`dwi` (an `ALSQuantLib.io.DWI`) as an NRRD file whose gradients are stored in a measurement frame: `frame`'s
    columns are the frame's axes in LPS, written as teem defines the field (vector i is column i; pynrrd writes
    each row of the matrix it is given as one vector, hence the transpose)."""
    import nrrd

    from ALSQuantLib import io

    io.write_dwi(dwi, path)  # Slicer's layout: LPS gradients, identity frame
    data, header = nrrd.read(str(path))
    for key in [k for k in header if k.startswith("DWMRI_gradient_")]:
        g_lps = np.array([float(v) for v in header[key].split()])
        header[key] = " ".join(f"{v:.10f}" for v in np.linalg.solve(frame, g_lps))
    header["measurement frame"] = np.asarray(frame, dtype=float).T
    nrrd.write(str(path), data, header)
