"""ALSQuantLib.phantom and ALSQuantLib.dipole: numbers against DIPY and analytic fields."""

import numpy as np
import pytest

from ALSQuantLib import cli, dipole, geometry, io, phantom
from ALSQuantLib.errors import InputError

SMALL = phantom.PhantomConfig(
    dwi_shape=(40, 48, 36), dwi_voxel_size=(3.5, 3.5, 3.5), gre_shape=(48, 56, 44), gre_voxel_size=(3.0, 3.0, 3.0)
)


def dipy_dki_maps(bvals, bvecs, signal):
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dki import DiffusionKurtosisModel

    fit = DiffusionKurtosisModel(gradient_table(bvals, bvecs=bvecs), fit_method="WLS").fit(signal)
    return fit.mk(min_kurtosis=0, max_kurtosis=10), fit.fa, fit.md


def test_dki_signal_is_recovered_by_dipy_exactly():
    """Noise-free phantom signals fitted by DIPY return the phantom's MK, FA and MD (Tabesh analytic MK)."""
    rng = np.random.default_rng(0)
    bvals, bvecs = phantom.acquisition_scheme()
    n = 60
    fa = rng.uniform(0.0, 0.75, n)
    md = rng.uniform(0.6e-3, 1.2e-3, n)
    mk = rng.uniform(0.5, 1.3, n)
    fibre = rng.normal(size=(n, 3))
    fibre /= np.linalg.norm(fibre, axis=1, keepdims=True)
    signal = phantom.dki_signal(bvals, bvecs, fa, md, mk, fibre, s0=1000.0)
    mk_dipy, fa_dipy, md_dipy = dipy_dki_maps(bvals, bvecs, signal)
    np.testing.assert_allclose(mk_dipy, mk, atol=1e-3)
    np.testing.assert_allclose(fa_dipy, fa, atol=1e-3)
    np.testing.assert_allclose(md_dipy, md, rtol=1e-3)


def test_diffusion_eigenvalues_give_the_requested_fa_and_md():
    fa = np.array([0.0, 0.3, 0.6, 0.8])
    lam_par, lam_perp = phantom.diffusion_eigenvalues(fa, 0.8e-3)
    evals = np.stack([lam_par, lam_perp, lam_perp], axis=1)
    md = evals.mean(axis=1)
    fa_back = np.sqrt(1.5 * np.sum((evals - md[:, None]) ** 2, axis=1) / np.sum(evals**2, axis=1))
    np.testing.assert_allclose(md, 0.8e-3)
    np.testing.assert_allclose(fa_back, fa, atol=1e-12)


def test_group_distributions_follow_the_study():
    rng = np.random.default_rng(5)
    draws = {g: [phantom.draw_subject_values(g, rng) for _ in range(400)] for g in phantom.GROUPS}

    def values(group, key):
        return np.array([d[key] for d in draws[group]])

    # ranges of the study (controls / ALS), medians close to its medians
    assert 1.02 <= values("control", "cst_mk").min() and values("control", "cst_mk").max() <= 1.14
    assert 0.92 <= values("ALS", "cst_mk").min() and values("ALS", "cst_mk").max() <= 1.08
    assert np.median(values("control", "cst_mk")) == pytest.approx(1.09, abs=0.01)
    assert np.median(values("ALS", "cst_mk")) == pytest.approx(1.04, abs=0.01)
    assert np.median(values("control", "m1_chi")) == pytest.approx(0.14, abs=0.015)
    assert np.median(values("ALS", "m1_chi")) == pytest.approx(0.23, abs=0.015)
    assert np.median(values("ALS", "cst_md")) > np.median(values("control", "cst_md"))
    # FA unchanged: medians within a quarter of an SD
    assert abs(np.median(values("ALS", "cst_fa")) - np.median(values("control", "cst_fa"))) < 0.01
    with pytest.raises(InputError, match="group 'PLS'"):
        phantom.draw_subject_values("PLS", rng)


def effective_radius(mask, voxel_volume):
    return (3 * mask.sum() * voxel_volume / (4 * np.pi)) ** (1 / 3)


@pytest.mark.parametrize(
    "voxel_size, b0",
    [((1.0, 1.0, 1.0), (0.0, 0.0, 1.0)), ((1.0, 1.0, 2.0), (0.0, np.sin(0.5), np.cos(0.5)))],
)
def test_forward_field_matches_analytic_sphere(voxel_size, b0):
    """Field of a sphere: χ/3 (a/r)³ (3cos²θ − 1) outside, zero inside (Lorentz-corrected)."""
    radius = 8.0 if voxel_size[2] == 1.0 else 12.0  # at least 6 voxels across along every axis
    shape = tuple(int(np.ceil(6 * radius / v)) for v in voxel_size)
    affine = geometry.voxel_grid_affine(shape, voxel_size)
    points = geometry.voxel_centers_world(shape, affine)
    r = np.linalg.norm(points, axis=-1)
    chi = (r <= radius).astype(np.float32)
    a = effective_radius(chi > 0, np.prod(voxel_size))
    field = dipole.forward_field(chi, voxel_size, b0)
    cos_theta = (points @ np.asarray(b0)) / np.maximum(r, 1e-9)
    analytic = (a / np.maximum(r, 1e-9)) ** 3 * (3 * cos_theta**2 - 1) / 3
    outside = (r > 1.5 * a) & (r < 2.5 * a)
    error = field[outside] - analytic[outside]
    assert np.sqrt(np.mean(error**2)) < 0.03 * np.abs(analytic[outside]).max()
    # Inside: zero up to the voxelisation of the sphere, which an oblique B0 sees most (measured: mean 1.1 % of χ
    # at 1 mm, halving at 0.5 mm; 0.05 % with B0 along a grid axis).
    inside = np.abs(field[r < 0.6 * a])
    assert inside.mean() < 0.02 and inside.max() < 0.05


def test_gre_phase_difference_between_echoes_is_the_field():
    config = phantom.with_overrides(SMALL, echo_times=(0.004, 0.008), snr_gre=1e6)
    subject = phantom.simulate_subject("control", 7, config)
    brain = subject.truth_gre["label"] > 0
    delta = np.angle(np.exp(1j * (subject.gre.phase[..., 1] - subject.gre.phase[..., 0])))
    expected = dipole.field_ppm_to_phase(subject.truth_gre["total_field"], 0.004, 3.0)
    wrapped_error = np.angle(np.exp(1j * (delta - expected)))
    assert np.abs(wrapped_error[brain]).max() < 1e-3


def test_phantom_dwi_fitted_by_dipy_returns_the_subject_truth():
    config = phantom.with_overrides(SMALL, snr_dwi=1e6)
    subject = phantom.simulate_subject("ALS", 11, config)
    labels = subject.truth_dwi["label"]
    cst = np.isin(labels, phantom.REGIONS["CST"])
    assert cst.sum() > 100
    mk, fa, md = dipy_dki_maps(subject.dwi.bvals, subject.dwi.bvecs, subject.dwi.data[cst])
    np.testing.assert_allclose(mk, subject.values["cst_mk"], atol=1e-3)
    np.testing.assert_allclose(fa, subject.values["cst_fa"], atol=1e-3)
    np.testing.assert_allclose(md, subject.values["cst_md"], rtol=1e-3)


def test_subject_is_deterministic_and_deformed():
    a = phantom.simulate_subject("control", 3, SMALL)
    b = phantom.simulate_subject("control", 3, SMALL)
    c = phantom.simulate_subject("control", 4, SMALL)
    np.testing.assert_array_equal(a.dwi.data, b.dwi.data)
    np.testing.assert_array_equal(a.gre.phase, b.gre.phase)
    assert a.values == b.values and a.values != c.values
    # different subjects have different anatomy: the label maps disagree on a real fraction of the brain
    brain = (a.truth_dwi["label"] > 0) | (c.truth_dwi["label"] > 0)
    assert np.mean(a.truth_dwi["label"][brain] != c.truth_dwi["label"][brain]) > 0.05
    for region in ("CST", "M1"):
        for label in phantom.REGIONS[region]:
            assert np.count_nonzero(a.truth_dwi["label"] == label) > 20
            assert np.count_nonzero(a.truth_gre["label"] == label) > 20


def test_oblique_gre_uses_b0_in_voxel_axes():
    config = phantom.with_overrides(SMALL, gre_tilt_deg=25.0, snr_gre=1e6)
    subject = phantom.simulate_subject("control", 2, config)
    np.testing.assert_allclose(subject.gre.b0_direction, [0.0, np.sin(np.deg2rad(25)), np.cos(np.deg2rad(25))])
    chi = subject.truth_gre["chi"]
    brain = subject.truth_gre["label"] > 0
    expected = dipole.forward_field(
        np.where(brain, chi, 0), geometry.voxel_sizes(subject.gre.affine), subject.gre.b0_direction
    )
    np.testing.assert_allclose(subject.truth_gre["local_field"], expected, atol=1e-6)


def test_the_dwi_slab_is_the_studys_partial_coverage(tmp_path):
    """`--dwi-slab`: 28 axial slices of 3 mm centred 10 mm above the origin; the truth follows the same grid, so the
    CST is cut (part of it in the slab) and the in-plane grid is unchanged."""
    out = tmp_path / "slab"
    assert cli.main(["simulate", "--subjects", "1", "--out", str(out), "--dwi-slab"]) == 0
    dwi = io.read_dwi(out / "sub-01" / "dwi" / "sub-01_dwi.nii.gz")
    assert dwi.data.shape[:3] == (*phantom.PhantomConfig().dwi_shape[:2], 28)
    np.testing.assert_allclose(geometry.voxel_sizes(dwi.affine), (3.0, 3.0, 3.0))
    centre = dwi.affine @ [*(np.array(dwi.data.shape[:3]) - 1) / 2, 1]
    np.testing.assert_allclose(centre[:3], (0.0, 0.0, 10.0), atol=1e-3)
    label, affine = io.load_image(out / phantom.TRUTH_DIR / "sub-01" / "sub-01_space-dwi_label.nii.gz")
    assert label.shape == dwi.data.shape[:3] and np.array_equal(affine, dwi.affine)
    assert np.isin(label, phantom.REGIONS["CST"]).sum() > 50


def test_simulate_command_writes_a_bids_like_cohort(tmp_path):
    out = tmp_path / "cohort"
    code = cli.main(["simulate", "--subjects", "3", "--out", str(out), "--seed", "9", "--als-fraction", "0.67"])
    assert code == 0
    participants = io.read_table(out / "participants.tsv")
    assert [p["participant_id"] for p in participants] == ["sub-01", "sub-02", "sub-03"]
    assert sorted(p["group"] for p in participants) == ["ALS", "ALS", "control"]
    dwi = io.read_dwi(out / "sub-01" / "dwi" / "sub-01_dwi.nii.gz")
    assert dwi.data.shape == phantom.PhantomConfig().dwi_shape + (42,)
    assert sorted(np.unique(dwi.bvals).tolist()) == [0.0, 1000.0, 2500.0]
    anat = out / "sub-01" / "anat"
    gre = io.read_gre(anat / "sub-01_part-mag_T2starw.nii.gz", anat / "sub-01_part-phase_T2starw.nii.gz")
    assert gre.echo_times.tolist() == [0.015] and gre.field_strength == 3.0
    truth = out / phantom.TRUTH_DIR
    for name in ("template_T1w.nii.gz", "template_FA.nii.gz", "template_label.nii.gz", "template_label.ctbl"):
        assert (truth / "template" / name).is_file()
    assert (truth / "sub-02" / "sub-02_space-gre_chi.nii.gz").is_file()
    groups = {p["participant_id"]: p["group"] for p in participants}
    assert io.read_json(truth / "sub-03" / "sub-03_truth.json")["group"] == groups["sub-03"]
    # the same seed rewrites the same data; a foreign folder is refused
    before = (out / "sub-02" / "dwi" / "sub-02_dwi.nii.gz").read_bytes()
    assert cli.main(["simulate", "--subjects", "3", "--out", str(out), "--seed", "9", "--als-fraction", "0.67"]) == 0
    assert (out / "sub-02" / "dwi" / "sub-02_dwi.nii.gz").read_bytes() == before
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert cli.main(["simulate", "--subjects", "1", "--out", str(foreign)]) == 2
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_simulate_command_refuses_bad_options(tmp_path, capsys):
    assert cli.main(["simulate", "--subjects", "2", "--out", str(tmp_path / "x"), "--als-fraction", "1.5"]) == 2
    assert "ALS fraction: expected a value from 0 to 1" in capsys.readouterr().err
    assert cli.main(["simulate", "--out", str(tmp_path / "y"), "--echo-times", "15"]) == 2
    assert "milliseconds" in capsys.readouterr().err


def test_eddy_distortions_move_points_along_the_phase_axis_in_proportion_to_b():
    bvals = np.array([0.0, 1000.0, 2500.0])
    gradient = np.array([0.6, 0.0, 0.8])
    bvecs = np.array([[0.0, 0, 0], gradient, gradient])
    centre, axis = np.array([1.0, -2.0, 3.0]), np.array([0.0, 1.0, 0.0])
    affines = phantom.eddy_distortions(bvals, bvecs, 0.02, 2.0, centre, axis, np.random.default_rng(4))
    assert np.array_equal(affines[0], np.eye(4))
    points = np.random.default_rng(5).uniform(-80, 80, (100, 3))
    moves = [points @ a[:3, :3].T + a[:3, 3] - points for a in affines[1:]]
    for move in moves:
        assert np.allclose(move[:, [0, 2]], 0.0) and np.abs(move[:, 1]).max() > 0.1  # along y only
    np.testing.assert_allclose(moves[1], 2.5 * moves[0])  # the same gradient, 2.5 times the b-value
    # |e_i| <= 0.02 |g|_1 and |t| <= 2 mm |g|_1 at b_max: the displacement's bound
    bound = 0.02 * np.abs(gradient).sum() * np.abs(points - centre).sum(axis=1).max() + 2.0 * np.abs(gradient).sum()
    assert np.abs(moves[1]).max() <= bound


def test_head_motion_moves_each_volume_rigidly_and_turns_its_gradient():
    from scipy import ndimage
    from scipy.spatial.transform import Rotation

    config = phantom.with_overrides(SMALL, dwi_motion_deg=3.0, dwi_motion_mm=2.0, snr_dwi=1000.0)
    subject = phantom.simulate_subject("control", 3, config)
    poses, dwi = subject.dwi_motion, subject.dwi
    assert poses.shape == (len(dwi.bvals), 4, 4) and np.array_equal(poses[0], np.eye(4))
    for pose in poses[1:]:
        np.testing.assert_allclose(pose[:3, :3] @ pose[:3, :3].T, np.eye(3), atol=1e-12)
        assert np.all(np.abs(Rotation.from_matrix(pose[:3, :3]).as_euler("xyz", degrees=True)) <= 3.0 + 1e-9)
    assert np.degrees(Rotation.from_matrix(poses[1:, :3, :3]).magnitude()).max() > 2.0  # it did move
    # the second b = 0 volume is the first seen through its pose: brought back, it matches (measured 0.95, against
    # 0.41 as it lies; two cubic resamplings of 3.5 mm voxels across sharp tissue edges keep it below 1)
    restored = ndimage.affine_transform(dwi.data[..., 1], *_voxel_map(dwi.affine, poses[1]), order=3)
    brain = ndimage.binary_erosion(subject.truth_dwi["label"] > 0, iterations=2)
    still = np.corrcoef(dwi.data[..., 0][brain], dwi.data[..., 1][brain])[0, 1]
    aligned = np.corrcoef(dwi.data[..., 0][brain], restored[brain])[0, 1]
    assert aligned > 0.9 and aligned > still + 0.3, (aligned, still)
    # a moved head meets the gradient turned back: a volume's signal follows Rᵀ g, so the restored volumes fit better
    # with the gradients turned than as given (CST FA measured 6.0 % against 6.9 % off; the rest is the blur of
    # resampling a tract two voxels wide, twice)
    from ALSQuantLib import dki

    restored = np.stack(
        [
            ndimage.affine_transform(dwi.data[..., n], *_voxel_map(dwi.affine, pose), order=3)
            for n, pose in enumerate(poses)
        ],
        axis=-1,
    )
    turned = np.einsum("nji,nj->ni", poses[:, :3, :3], dwi.bvecs)
    cst = np.isin(subject.truth_dwi["label"], phantom.REGIONS["CST"])
    errors = {}
    for name, bvecs in (("turned", turned), ("as given", dwi.bvecs)):
        restored_dwi = io.DWI(restored, dwi.affine, dwi.bvals, bvecs)
        fit, _, _ = dki.reconstruct(
            restored_dwi, dki.DKIOptions(motion_correction=False), mask=subject.truth_dwi["label"] > 0
        )
        errors[name] = abs(np.median(fit.fa[cst]) / subject.values["cst_fa"] - 1)
    assert errors["turned"] < 0.08 and errors["turned"] < errors["as given"] - 0.005, errors


def _voxel_map(affine, pose):
    """`ndimage.affine_transform`'s matrix and offset that bring an image seen through `pose` back to the still head."""
    back = np.linalg.inv(affine) @ pose @ affine
    return back[:3, :3], back[:3, 3]
