"""ALSQuantLib.io: round trips through real files, clear errors, and the real DWI under ../shared/data."""

import json

import nibabel as nib
import numpy as np
import pytest
from conftest import random_rotation, write_nrrd_in_frame

from ALSQuantLib import geometry, io, outputs
from ALSQuantLib.errors import InputError


def make_dwi(affine=None, n=7, seed=0):
    rng = np.random.default_rng(seed)
    bvals = np.array([0.0] + [1000.0] * 3 + [2500.0] * (n - 4))
    bvecs = rng.normal(size=(n, 3))
    bvecs /= np.linalg.norm(bvecs, axis=1, keepdims=True)
    bvecs[0] = 0
    affine = np.diag([2.0, 2.0, 3.0, 1.0]) if affine is None else affine
    data = rng.uniform(10, 1000, size=(4, 5, 3, n)).astype(np.float32)
    return io.DWI(data, affine, bvals, bvecs)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_dwi_round_trip(tmp_path, suffix):
    affine = np.eye(4)
    t = np.deg2rad(15)
    affine[:3, :3] = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]]) @ np.diag([2, 2, 3])
    affine[:3, 3] = [-30, 12, 7]
    dwi = make_dwi(affine)
    path = tmp_path / f"sub-01_dwi{suffix}"
    io.write_dwi(dwi, path)
    back = io.read_dwi(path)
    np.testing.assert_allclose(back.data, dwi.data)
    np.testing.assert_allclose(back.affine, dwi.affine, atol=1e-5)
    np.testing.assert_allclose(back.bvals, dwi.bvals, rtol=1e-6)
    np.testing.assert_allclose(back.bvecs, dwi.bvecs, atol=1e-6)


def test_nrrd_dwi_header_follows_slicer_conventions(tmp_path):
    import nrrd

    dwi = make_dwi()
    path = tmp_path / "dwi.nrrd"
    io.write_dwi(dwi, path)
    _, header = nrrd.read(str(path))
    assert header["space"] == "left-posterior-superior"
    assert header["kinds"][0] == "list" and float(header["DWMRI_b-value"]) == 2500.0
    g = np.array([float(v) for v in header["DWMRI_gradient_0001"].split()])
    # b = 1000 of a 2500 maximum: |g|² = 0.4, direction in LPS
    assert np.dot(g, g) == pytest.approx(0.4, rel=1e-6)
    np.testing.assert_allclose(g / np.linalg.norm(g), geometry.LPS_TO_RAS @ dwi.bvecs[1], atol=1e-6)


def test_nrrd_with_measurement_frame_is_honoured(tmp_path):
    import nrrd

    frame = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # a 90° rotation about z
    data = np.ones((2, 3, 3, 3), dtype=np.float32)
    header = {
        "space": "left-posterior-superior",
        "space directions": np.array([[np.nan] * 3, [2, 0, 0], [0, 2, 0], [0, 0, 2.0]]),
        "space origin": np.zeros(3),
        "kinds": ["list", "domain", "domain", "domain"],
        "measurement frame": frame,
        "modality": "DWMRI",
        "DWMRI_b-value": "1000",
        "DWMRI_gradient_0000": "0 0 0",
        "DWMRI_gradient_0001": "1 0 0",
    }
    nrrd.write(str(tmp_path / "mf.nrrd"), data, header)
    dwi = io.read_dwi(tmp_path / "mf.nrrd")
    # the header's first vector, (0, -1, 0), is the frame's x axis (teem: vector i is column i): gradient x is LPS -y,
    # i.e. RAS +y
    np.testing.assert_allclose(dwi.bvecs[1], [0.0, 1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(dwi.bvals, [0.0, 1000.0])
    np.testing.assert_allclose(np.diag(dwi.affine), [-2.0, -2.0, 2.0, 1.0])


def test_nrrd_oblique_measurement_frame_gives_the_gradients_of_the_nifti_route(tmp_path):
    frame = random_rotation(np.random.default_rng(11))  # oblique and asymmetric: a transposed reading is wrong
    affine = np.eye(4)
    affine[:3, :3] = random_rotation(np.random.default_rng(12)) @ np.diag([2.0, 2.0, 3.0])
    dwi = make_dwi(affine)
    write_nrrd_in_frame(dwi, tmp_path / "dwi.nrrd", frame)
    io.write_dwi(dwi, tmp_path / "dwi.nii.gz")
    from_nrrd, from_nifti = io.read_dwi(tmp_path / "dwi.nrrd"), io.read_dwi(tmp_path / "dwi.nii.gz")
    np.testing.assert_allclose(from_nrrd.bvecs, dwi.bvecs, atol=1e-6)
    np.testing.assert_allclose(from_nrrd.bvecs, from_nifti.bvecs, atol=1e-6)
    np.testing.assert_allclose(from_nrrd.bvecs_voxel, from_nifti.bvecs_voxel, atol=1e-6)
    np.testing.assert_allclose(from_nrrd.bvals, dwi.bvals, rtol=1e-6)
    # the frame read transposed (pynrrd's rows taken as columns) puts these gradients tens of degrees off
    transposed = (geometry.LPS_TO_RAS @ frame.T @ frame.T @ geometry.LPS_TO_RAS @ dwi.bvecs[1:].T).T
    angles = np.degrees(np.arccos(np.clip(np.sum(transposed * dwi.bvecs[1:], axis=1), -1, 1)))
    assert np.median(angles) > 10


def test_dwi_errors_name_the_file(tmp_path):
    dwi = make_dwi()
    path = tmp_path / "d_dwi.nii.gz"
    io.write_dwi(dwi, path)
    (tmp_path / "short.bval").write_text("0 1000 1000\n")
    with pytest.raises(InputError, match=r"short\.bval.*3 b-values|3 values"):
        io.read_dwi(path, bval=tmp_path / "short.bval")
    with pytest.raises(InputError, match="missing.bvec: file not found"):
        io.read_dwi(path, bvec=tmp_path / "missing.bvec")
    three_d = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3), np.float32), np.eye(4)), three_d)
    with pytest.raises(InputError, match=r"vol\.nii\.gz: expected a 4D"):
        io.read_dwi(three_d, bval=tmp_path / "d_dwi.bval", bvec=tmp_path / "d_dwi.bvec")
    bad = dwi.data.copy()
    bad[0, 0, 0, 2] = np.nan
    nib.save(nib.Nifti1Image(bad, dwi.affine), tmp_path / "nan_dwi.nii.gz")
    # Non-finite signals are read as they are: the fit masks and counts them (test_dki), as the README says.
    read = io.read_dwi(tmp_path / "nan_dwi.nii.gz", bval=tmp_path / "d_dwi.bval", bvec=tmp_path / "d_dwi.bvec")
    assert np.isnan(read.data[0, 0, 0, 2]) and np.isfinite(read.data).sum() == read.data.size - 1
    with pytest.raises(InputError, match="7 volumes but 6 b-values"):
        io.DWI(dwi.data, dwi.affine, dwi.bvals[:6], dwi.bvecs[:6])


def test_writes_are_atomic_and_leave_no_temporary(tmp_path):
    path = tmp_path / "map.nii.gz"
    io.save_image(path, np.ones((2, 2, 2)), np.eye(4))
    with pytest.raises(RuntimeError):
        with outputs.atomic_path(path) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert nib.load(path).get_fdata().sum() == 8  # the old file survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.nii.gz"]


def write_echo(folder, stem, mag, phase, affine, sidecar):
    nib.save(nib.Nifti1Image(mag, affine), folder / f"{stem}_part-mag_MEGRE.nii.gz")
    nib.save(nib.Nifti1Image(phase, affine), folder / f"{stem}_part-phase_MEGRE.nii.gz")
    (folder / f"{stem}_part-phase_MEGRE.json").write_text(json.dumps(sidecar))


def test_gre_multi_echo_from_bids_sidecars(tmp_path):
    rng = np.random.default_rng(0)
    affine = np.diag([0.5, 0.5, 2.0, 1.0])
    echo_times = [0.004, 0.008, 0.012]
    mags, phases = [], []
    for n, te in enumerate(echo_times, 1):
        mag, phase = rng.uniform(0, 1, (4, 4, 3)).astype(np.float32), rng.uniform(-3, 3, (4, 4, 3)).astype(np.float32)
        write_echo(tmp_path, f"sub-01_echo-{n}", mag, phase, affine, {"EchoTime": te, "MagneticFieldStrength": 3})
        mags.append(mag)
        phases.append(phase)
    gre = io.read_gre(
        [tmp_path / f"sub-01_echo-{n}_part-mag_MEGRE.nii.gz" for n in (1, 2, 3)],
        [tmp_path / f"sub-01_echo-{n}_part-phase_MEGRE.nii.gz" for n in (1, 2, 3)],
    )
    assert gre.magnitude.shape == (4, 4, 3, 3)
    np.testing.assert_array_equal(gre.phase[..., 2], phases[2])
    np.testing.assert_allclose(gre.echo_times, echo_times)
    assert gre.field_strength == 3.0
    np.testing.assert_allclose(gre.b0_direction, [0, 0, 1])


def test_gre_single_echo_and_errors(tmp_path):
    affine = np.eye(4)
    mag = np.ones((3, 3, 3), np.float32)
    write_echo(tmp_path, "a", mag, mag, affine, {"EchoTime": 15, "MagneticFieldStrength": 3})
    mag_path, phase_path = tmp_path / "a_part-mag_MEGRE.nii.gz", tmp_path / "a_part-phase_MEGRE.nii.gz"
    with pytest.raises(InputError, match="look like milliseconds.*0.015"):
        io.read_gre(mag_path, phase_path)
    gre = io.read_gre(mag_path, phase_path, echo_times=[0.015])
    assert gre.magnitude.shape == (3, 3, 3, 1) and gre.echo_times.tolist() == [0.015]
    write_echo(tmp_path, "b", mag, mag, affine, {"MagneticFieldStrength": 3})
    with pytest.raises(InputError, match="no EchoTime"):
        io.read_gre(tmp_path / "b_part-mag_MEGRE.nii.gz", tmp_path / "b_part-phase_MEGRE.nii.gz")
    with pytest.raises(InputError, match="field strength must be given in tesla"):
        io.read_gre(mag_path, phase_path, echo_times=[0.015], field_strength=3000)
    other = tmp_path / "other.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((3, 3, 4), np.float32), affine), other)
    with pytest.raises(InputError, match="differ in shape"):
        io.read_gre(mag_path, other, echo_times=[0.015], field_strength=3)


def test_tables_round_trip(tmp_path):
    rows = [{"participant_id": "sub-01", "group": "ALS", "mk": 1.01}, {"participant_id": "sub-02", "group": "control"}]
    io.write_table(tmp_path / "p.tsv", rows)
    back = io.read_table(tmp_path / "p.tsv")
    assert back == [
        {"participant_id": "sub-01", "group": "ALS", "mk": "1.01"},
        {"participant_id": "sub-02", "group": "control", "mk": ""},
    ]
    assert "\t" in (tmp_path / "p.tsv").read_text()


@pytest.mark.parametrize(
    "folder, stem, shape, shells",
    [
        ("mdt_b1k_b2k", "b1k_b2k_example_slices_24_38", (104, 104, 2, 103), {0: 13, 1000: 30, 2000: 60}),
        ("mrtrix_msmt", "dwi", (15, 15, 11, 102), {0: 6, 700: 16, 1200: 30, 2800: 50}),
    ],
)
def test_real_dwi_reads_correctly(shared_data, folder, stem, shape, shells):
    base = shared_data / "dwi" / folder
    bval = next(base.glob("*.bval"))
    bvec = next(base.glob("*.bvec"))
    dwi = io.read_dwi(base / f"{stem}.nii.gz", bval=bval, bvec=bvec)
    assert dwi.data.shape == shape
    rounded = np.round(dwi.bvals / 100) * 100
    assert {int(b): int(np.sum(rounded == b)) for b in np.unique(rounded)} == shells
    weighted = dwi.bvals > 50
    np.testing.assert_allclose(np.linalg.norm(dwi.bvecs[weighted], axis=1), 1.0, atol=1e-3)
    # b0 volumes are brighter than the highest shell inside the brain
    b0 = dwi.data[..., ~weighted].mean(axis=-1)
    high = dwi.data[..., rounded == rounded.max()].mean(axis=-1)
    brain = b0 > np.percentile(b0, 60)
    assert np.median(high[brain] / b0[brain]) < 0.6
