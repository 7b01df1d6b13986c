"""Subjects made from real anatomy (ALSQuantLib.anatomy): MNI152 tissue from nilearn's wheel, the CST and M1 from the
real JHU and Harvard-Oxford files (../shared), the phantom's signal models. Skipped without either."""

import numpy as np
import pytest
from conftest import fsl_layout

from ALSQuantLib import cli, geometry, io, phantom

pytest.importorskip("nilearn")


@pytest.fixture(scope="module")
def fsldir(tmp_path_factory):
    from conftest import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    return fsl_layout(SHARED_DATA, tmp_path_factory.mktemp("fsl") / "fsl")


@pytest.fixture(scope="module")
def real(fsldir):
    from ALSQuantLib import anatomy

    return anatomy.RealAnatomy(fsldir=fsldir)


def test_real_anatomy_places_the_cst_and_m1_where_the_atlases_do(real, fsldir):
    from ALSQuantLib import atlas

    labels = real.labels
    tracts = atlas.find_atlas("jhu-tracts", fsldir=fsldir)
    jhu, jhu_affine = tracts.load_labels()
    on_grid = geometry.resample(jhu, jhu_affine, labels.shape, real.affine, order=0)
    for code, value in ((phantom.CST_LEFT, 3), (phantom.CST_RIGHT, 4)):
        cst = labels == code
        # Every CST voxel is JHU's CST; JHU's CST in brain tissue (not CSF) is all CST.
        assert cst.any() and np.all(on_grid[cst] == value)
        tissue = np.isin(labels, (phantom.GM, phantom.WM, phantom.CST_LEFT, phantom.CST_RIGHT, 6, 7))
        assert np.array_equal(cst, (on_grid == value) & tissue & ~np.isin(labels, (6, 7)))
        # The CST runs from the cortex to the brainstem: its fibres point up and down (|z| > 0.7 everywhere).
        assert np.min(np.abs(real.fibre[cst][:, 2])) > 0.7
    world_x = geometry.voxel_centers_world(labels.shape, real.affine)[..., 0]
    assert np.all(world_x[labels == phantom.M1_LEFT] < 0) and np.all(world_x[labels == phantom.M1_RIGHT] > 0)
    assert (labels == phantom.M1_LEFT).sum() > 10_000  # the precentral gyrus's grey matter, 1 mm voxels


def test_simulate_with_real_anatomy_writes_a_dataset_without_the_phantom_atlas(fsldir, tmp_path):
    out = tmp_path / "ds"
    code = cli.main(["simulate", "--anatomy", "mni152", "--fsldir", str(fsldir), "--subjects", "1", "--out", str(out)])
    assert code == 0
    assert not (out / phantom.TRUTH_DIR / "template").exists()  # labelled with real atlases, not the phantom's
    assert "MNI152 2009a" in io.read_json(out / "dataset_description.json")["PhantomParameters"]["anatomy"]
    truth = io.load_image(out / phantom.TRUTH_DIR / "sub-01" / "sub-01_space-dwi_label.nii.gz")[0]
    counts = {code: int((truth == code).sum()) for code in (phantom.CST_LEFT, phantom.CST_RIGHT, 6, 7)}
    assert all(n > 100 for n in counts.values()), counts
    brain = truth > 0
    edges = np.concatenate([brain[[0, -1]].ravel(), brain[:, [0, -1]].ravel(), brain[:, :, [0, -1]].ravel()])
    assert not edges.any()  # the whole brain lies inside the field of view


def test_white_matter_fa_can_follow_a_real_fa_map(fsldir):
    from conftest import SHARED_DATA

    from ALSQuantLib import anatomy

    real = anatomy.RealAnatomy(fsldir=fsldir, fa_template=SHARED_DATA / "templates" / "MNI_FA_template_1.25mm.nii.gz")
    config = anatomy.anatomy_config()
    with_map = phantom.simulate_subject("control", 7, config, anatomy=real)
    per_class = phantom.simulate_subject("control", 7, config, anatomy=anatomy.real_anatomy(str(fsldir)))
    white = with_map.truth_dwi["label"] == phantom.WM
    assert np.array_equal(white, per_class.truth_dwi["label"] == phantom.WM)  # the same anatomy and pose
    assert np.ptp(per_class.truth_dwi["fa"][white]) == 0  # one value per class
    fa = with_map.truth_dwi["fa"][white]
    assert fa.std() > 0.08 and 0.2 < np.median(fa) < 0.6  # a real map's spread; 0.28 where P(WM) > 0.5 here
    cst = np.isin(with_map.truth_dwi["label"], (phantom.CST_LEFT, phantom.CST_RIGHT))
    assert np.median(with_map.truth_dwi["fa"][cst]) > np.median(fa)  # the CST is among the most anisotropic tracts
