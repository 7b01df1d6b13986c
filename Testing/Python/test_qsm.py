"""ALSQuantLib.qsm: each step against analytic fields and the phantom's truth."""

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from ALSQuantLib import cli, dipole, geometry, io, masks, metrics, phantom, qsm
from ALSQuantLib.errors import InputError


def sphere_case(voxel_size=(1.0, 1.0, 1.0), b0=(0.0, 0.0, 1.0), radius=8.0, chi=0.2):
    """A sphere of susceptibility `chi` (ppm) in a uniform background and its analytic field."""
    shape = tuple(int(np.ceil(8 * radius / v)) for v in voxel_size)
    affine = geometry.voxel_grid_affine(shape, voxel_size)
    points = geometry.voxel_centers_world(shape, affine)
    r = np.linalg.norm(points, axis=-1)
    inside = r <= radius
    a = (3 * inside.sum() * np.prod(voxel_size) / (4 * np.pi)) ** (1 / 3)
    cos_theta = points @ np.asarray(b0) / np.maximum(r, 1e-9)
    field = np.where(inside, 0.0, chi * (a / np.maximum(r, 1e-9)) ** 3 * (3 * cos_theta**2 - 1) / 3)
    return (inside * chi).astype(np.float32), field.astype(np.float32), r, radius


def _same_angles(a, b, atol=1e-3):
    """Equal as angles up to one constant offset (a phase stored from 0 to 2π)."""
    difference = np.angle(np.exp(1j * (np.asarray(a, float) - np.asarray(b, float))))
    return np.abs(np.angle(np.exp(1j * (difference - difference.flat[0])))).max() < atol


def test_scale_phase_recognises_every_unit_scanners_write():
    rng = np.random.default_rng(0)
    radians = rng.uniform(-np.pi, np.pi, (8, 8, 8)).astype(np.float32)
    radians.flat[:2] = [-np.pi, np.pi - 1e-6]  # a phase image with noise reaches both ends
    stored = {
        "radians": radians,
        "degrees": np.degrees(radians),
        "milliradians": np.round(radians * 1000),  # GE's integers: read as 12-bit they came out x 0.77
        "int12": np.round(radians / np.pi * 4096).clip(-4096, 4095),
    }
    for units, data in stored.items():
        for given in ("auto", units):
            out, how, warning = qsm.scale_phase(data, given)
            assert how.startswith(units) and warning is None, (units, given, how)
            assert _same_angles(out, radians, atol=2e-3), units
    unsigned = np.round((radians + np.pi) / (2 * np.pi) * 4096) % 4096  # 0…4095, as DICOM stores it
    out, how, warning = qsm.scale_phase(unsigned)
    assert how.startswith("int12") and warning is None and _same_angles(out, radians, atol=2e-3)
    scaled = (radians + np.pi) / (2 * np.pi) * 0.00734 - 0.00367  # stored like the ROMEO test data
    out, how, warning = qsm.scale_phase(scaled)
    assert _same_angles(out, radians, atol=1e-5) and "rescaled" in how and "--phase-units" in warning
    narrow = radians * 0.5  # a crop without wraps: radians, but not for sure
    out, how, warning = qsm.scale_phase(narrow)
    assert how.startswith("radians") and "--phase-units" in warning
    np.testing.assert_allclose(qsm.scale_phase(narrow, "radians")[0], narrow, atol=1e-6)
    out, how, warning = qsm.scale_phase(narrow, sidecar_units="rad")  # BIDS: part-phase sidecars carry Units
    assert "sidecar" in how and warning is None and np.allclose(out, narrow, atol=1e-6)
    out, how, warning = qsm.scale_phase(stored["milliradians"], sidecar_units="rad")  # a sidecar that is wrong
    assert how.startswith("milliradians") and "sidecar says radians" in warning
    assert qsm.scale_phase(narrow, sidecar_units="arbitrary")[2] is not None
    with pytest.raises(InputError, match="constant"):
        qsm.scale_phase(np.zeros((3, 3, 3)))
    with pytest.raises(InputError, match="expected one of"):
        qsm.scale_phase(radians, "gradians")


def test_scanner_inputs_give_the_map_of_clean_magnitude_and_phase():
    """Real and imaginary parts, slice chopping, radians x 1000 and an inverted phase sign: each read the way a scanner
    writes it gives the map of the clean magnitude and phase (issue 17's target: correlation >= 0.999)."""
    subject = phantom.simulate_subject("control", 36, SMALL)
    gre = subject.gre
    clean = qsm.reconstruct_qsm(gre)
    assert clean.parameters["chopping"] == "none found"
    magnitude, radians = gre.magnitude, qsm.scale_phase(gre.phase)[0]
    chopped = qsm.unchopped(radians, [2])  # π added to every other slice is its own undoing
    cases = {
        "real/imaginary": (
            io.GRE.from_complex(
                magnitude * np.cos(radians), magnitude * np.sin(radians), gre.affine, gre.echo_times, 3.0
            ),
            qsm.QSMOptions(),
        ),
        "chopped": (dataclasses.replace(gre, phase=chopped), qsm.QSMOptions()),
        "milliradians": (dataclasses.replace(gre, phase=np.round(radians * 1000)), qsm.QSMOptions()),
        "sign inverted": (dataclasses.replace(gre, phase=-radians), qsm.QSMOptions(phase_sign="-1")),
    }
    inside = clean.mask
    for name, (scanner_gre, options) in cases.items():
        result = qsm.reconstruct_qsm(scanner_gre, options, mask=clean.brain_mask)
        correlation = np.corrcoef(result.susceptibility[inside], clean.susceptibility[inside])[0, 1]
        assert correlation >= 0.999, (name, correlation)
    assert "axes [2]" in qsm.reconstruct_qsm(cases["chopped"][0], mask=clean.brain_mask).parameters["chopping"]
    # and each would be wrong unread: chopping left in, the sign left inverted
    for name, options in (("chopped", qsm.QSMOptions(chopping="off")), ("sign inverted", qsm.QSMOptions())):
        result = qsm.reconstruct_qsm(cases[name][0], options, mask=clean.brain_mask)
        correlation = np.corrcoef(result.susceptibility[inside], clean.susceptibility[inside])[0, 1]
        assert correlation < 0.5, (name, correlation)


def test_chopping_is_found_on_a_real_gre_only_where_it_is(shared_data):
    folder = shared_data / "gre" / "romeo_small"
    magnitude, _ = io.load_image(folder / "Mag.nii", ndim=4)
    radians = qsm.scale_phase(io.load_image(folder / "Phase.nii", ndim=4)[0])[0]
    for echo in range(3):  # neighbours agree to 0.96-0.998 (magnitude-weighted mean of exp(iΔφ))
        assert qsm.chopped_axes(radians[..., echo], magnitude[..., echo]) == []
    for axis in range(3):
        assert qsm.chopped_axes(qsm.unchopped(radians[..., 0], [axis]), magnitude[..., 0]) == [axis]


def test_csf_reference_finds_the_ventricles_from_r2star():
    config = phantom.with_overrides(SMALL, echo_times=(0.004, 0.008, 0.012, 0.016))
    subject = phantom.simulate_subject("control", 37, config)
    result = qsm.reconstruct_qsm(subject.gre, qsm.QSMOptions(reference="csf"))
    csf = qsm.csf_region(
        subject.gre.magnitude, subject.gre.echo_times, result.mask, geometry.voxel_sizes(subject.gre.affine)
    )
    labels = subject.truth_gre["label"][csf]
    assert np.mean(labels == phantom.CSF) > 0.9 and csf.sum() > 50, (np.mean(labels == phantom.CSF), csf.sum())
    assert abs(result.susceptibility[csf].mean()) < 1e-5 and "CSF" in result.parameters["reference"]
    with pytest.raises(InputError, match="two or more echoes"):
        qsm.reconstruct_qsm(phantom.simulate_subject("control", 37, SMALL).gre, qsm.QSMOptions(reference="csf"))


def smooth_phase(shape=(64, 64, 48)):
    """Spans over 6π, at most 0.37 rad between neighbours."""
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    return (6 * x**2 + 4 * y * z + 3 * np.sin(2 * z) + 3).astype(np.float32)


def test_path_unwrapping_keeps_the_exact_phase():
    truth = smooth_phase()
    mask = np.ones(truth.shape, bool)
    unwrapped = qsm.unwrap_phase(qsm.wrap(truth), mask=mask, method="path")
    cycles = (unwrapped - truth) / (2 * np.pi)
    np.testing.assert_allclose(cycles, np.round(cycles), atol=1e-4)  # congruent with the wrapped phase
    assert np.ptp(np.round(cycles)) == 0  # and one global multiple of 2π


def test_laplacian_unwrapping_is_exact_up_to_a_harmonic_function():
    truth = smooth_phase()
    unwrapped = qsm.unwrap_phase(qsm.wrap(truth), method="laplacian")
    difference = (unwrapped - truth).astype(np.float64)
    interior = (slice(4, -4),) * 3
    residual = qsm.laplacian(difference)[interior]
    reference = qsm.laplacian(truth.astype(np.float64))[interior]
    # The wrapped Laplacian sin(Δφ) differs from Δφ by about Δφ³/6: measured 2 % RMS at 0.37 rad per voxel.
    assert np.sqrt(np.mean(residual**2)) < 0.05 * np.sqrt(np.mean(reference**2))
    assert np.ptp(truth) > 6 * np.pi  # the phase really wrapped


SMALL = phantom.PhantomConfig(dwi_shape=(8, 8, 8))


def test_multi_echo_combination_recovers_the_field():
    config = phantom.with_overrides(SMALL, echo_times=(0.004, 0.008, 0.012, 0.016), snr_gre=200.0)
    subject = phantom.simulate_subject("control", 31, config)
    gre = subject.gre
    brain = subject.truth_gre["label"] > 0
    mask = masks.brain_mask(gre.magnitude, geometry.voxel_sizes(gre.affine))
    field = qsm.combine_echoes(gre.phase, gre.magnitude, gre.echo_times, gre.field_strength, mask=mask, unwrap="path")
    error = (field - subject.truth_gre["total_field"])[mask & brain]
    # the receiver offset is removed, so the field is exact up to one global 2π/TE ambiguity and the noise
    assert np.std(error) < 0.005  # ppm; the total field spans about 0.4 ppm here
    assert np.ptp(subject.truth_gre["total_field"][mask]) > 0.2


def test_echo_times_in_milliseconds_are_refused():
    with pytest.raises(InputError, match="milliseconds"):
        qsm.combine_echoes(np.zeros((4, 4, 4, 2)), np.ones((4, 4, 4, 2)), [4.0, 8.0], 3.0)


@pytest.mark.parametrize(
    "voxel_size, b0", [((1.0, 1.0, 1.0), (0, 0, 1.0)), ((0.8, 0.8, 1.6), (0, np.sin(0.4), np.cos(0.4)))]
)
def test_inversions_on_an_analytic_sphere(voxel_size, b0, capsys):
    chi, field, r, radius = sphere_case(voxel_size, b0)
    mask = r < 3 * radius
    truth = qsm.reference(chi, mask)
    scores = {}
    for method in qsm.INVERSION_METHODS:
        estimate = qsm.reference(qsm.dipole_inversion(field, mask, voxel_size, b0_direction=b0, method=method), mask)
        contrast = estimate[r < radius - 2].mean() - estimate[(r > radius + 3) & mask].mean()
        scores[method] = (
            metrics.nrmse(estimate, truth, mask),
            metrics.hfen(estimate, truth, mask),
            metrics.xsim(estimate, truth, mask),
            contrast,
        )
    with capsys.disabled():
        for method, (n, h, x, c) in scores.items():
            print(
                f"\n  sphere {voxel_size} {method}: NRMSE {n:.1f} %, HFEN {h:.1f} %, XSIM {x:.3f}, contrast "
                f"{c:.3f} (true 0.200)"
            )
    assert scores["tv"][0] < scores["tkd"][0] and scores["tv"][0] < scores["cg"][0]
    assert scores["tv"][3] == pytest.approx(0.2, abs=0.02)


def true_local_field(config):
    """A phantom subject (ALS, seed 32) and the field of its sources inside its magnitude's brain mask: (GRE,
    subject, voxel size, mask, true χ, local field)."""
    subject = phantom.simulate_subject("ALS", 32, config)
    gre = subject.gre
    voxel_size = geometry.voxel_sizes(gre.affine)
    mask = masks.brain_mask(gre.magnitude, voxel_size)
    chi = subject.truth_gre["chi"]
    local = dipole.forward_field(np.where(mask, chi, 0), voxel_size, gre.b0_direction)
    return gre, subject, voxel_size, mask, chi, local


def test_inversions_on_the_phantom_from_its_true_local_field(capsys):
    """Dipole inversion alone, from the field of the sources inside the mask: TV must beat TKD and CG."""
    gre, subject, voxel_size, mask, chi, local = true_local_field(phantom.with_overrides(SMALL, gre_tilt_deg=20.0))
    truth = qsm.reference(chi, mask)
    m1 = np.isin(subject.truth_gre["label"], phantom.REGIONS["M1"]) & mask
    scores = {}
    for method in qsm.INVERSION_METHODS:
        estimate = qsm.reference(
            qsm.dipole_inversion(local, mask, voxel_size, b0_direction=gre.b0_direction, method=method), mask
        )
        scores[method] = (
            metrics.nrmse(estimate, truth, mask),
            estimate[m1].mean() - truth[m1].mean(),
            metrics.hfen(estimate, truth, mask),
            metrics.xsim(estimate, truth, mask),
        )
    wrong_b0 = qsm.reference(qsm.dipole_inversion(local, mask, voxel_size, b0_direction=(0, 0, 1), method="tv"), mask)
    with capsys.disabled():
        for method, (n, m1_error, h, x) in scores.items():
            print(
                f"\n  phantom, true local field, {method}: NRMSE {n:.1f} %, HFEN {h:.1f} %, XSIM {x:.3f}, M1 "
                f"mean error {m1_error:+.3f} ppm"
            )
        print(
            f"  the same with B0 taken as (0, 0, 1) instead of the oblique truth: NRMSE "
            f"{metrics.nrmse(wrong_b0, truth, mask):.1f} %"
        )
    assert scores["tv"][0] < scores["cg"][0] and scores["tv"][0] < scores["tkd"][0]
    # TV with the data term inside the mask only: measured 17.5 % and −0.013 ppm with χ free outside the mask (the
    # default), 13.0 % and −0.002 ppm penalised there (before the phantom had sulci, 13.4 % and −0.005 ppm, and 35 %
    # and −0.046 ppm when the field outside the mask was fitted as zero)
    assert scores["tv"][0] < 20 and abs(scores["tv"][1]) < 0.02
    assert metrics.nrmse(wrong_b0, truth, mask) > scores["tv"][0] + 5  # the oblique B0 matters


def test_background_removal_keeps_the_local_field_in_the_interior():
    """Each method on the phantom's true total field: the local field in the deep interior, where the background
    removal is well posed, correlates with the truth (sources inside the mask). LBV is the weakest there: its error
    is the harmonic function with the true local field's values on the mask's edge, which reaches the centre (the
    phantom's edge carries a local field of 0.017 ppm std, three times the interior's). On real anatomy with a
    head, from the true total field in the true brain, the deep interior's correlation was also lower with LBV
    (0.91-0.95 against V-SHARP's 0.96-0.97, three subjects)."""
    subject = phantom.simulate_subject("control", 33, SMALL)
    gre = subject.gre
    voxel_size = geometry.voxel_sizes(gre.affine)
    mask = masks.brain_mask(gre.magnitude, voxel_size)
    local_truth = dipole.forward_field(np.where(mask, subject.truth_gre["chi"], 0), voxel_size, gre.b0_direction)
    total = subject.truth_gre["total_field"]
    interior = ndimage.binary_erosion(mask, iterations=6)
    least = {"vsharp": 0.85, "pdf": 0.85, "lbv": 0.65}  # measured: V-SHARP 0.871, PDF 0.863, LBV 0.721
    for method in qsm.BACKGROUND_METHODS:
        local, valid = qsm.background_field_removal(total, mask, voxel_size, gre.b0_direction, method=method)
        region = interior & valid
        correlation = np.corrcoef(local[region], local_truth[region])[0, 1]
        assert correlation > least[method], (method, correlation)
    assert np.std(total[interior]) > 3 * np.std(local_truth[interior])  # the background really dominated


def test_lbv_removes_a_harmonic_background_exactly():
    """LBV's ground truth: a local field that is zero on the mask's edge plus a background whose discrete Laplacian
    is exactly zero (a harmonic polynomial of degree three, in mm on anisotropic voxels) comes back as the local
    field, to the solver's tolerance; the mask's edge is left out of the mask returned."""
    shape, voxel_size = (40, 44, 24), np.array([1.0, 1.2, 2.0])
    x, y, z = np.meshgrid(*[(np.arange(n) - n / 2) * v for n, v in zip(shape, voxel_size)], indexing="ij")
    mask = (x / 17) ** 2 + (y / 22) ** 2 + (z / 20) ** 2 < 1
    depth = ndimage.distance_transform_edt(ndimage.binary_erosion(mask), sampling=voxel_size)
    local = 0.02 * np.sin(x / 4) * np.minimum(depth, 6.0) / 6.0  # zero on the edge, structured inside
    background = 0.3 + 0.01 * x - 0.004 * z + 1e-3 * (x**2 - z**2) + 2e-5 * x * y * z
    estimate, inside = qsm.lbv(local + background, mask, voxel_size, tolerance=1e-10)
    assert inside.sum() == ndimage.binary_erosion(mask).sum() and not np.any(inside & ~mask)
    np.testing.assert_allclose(estimate[inside], local[inside], atol=1e-6)
    with pytest.raises(InputError, match="LBV"):
        qsm.lbv(local, np.zeros(shape, dtype=bool), voxel_size)


def test_real_multi_echo_gre_runs_and_is_plausible(shared_data, capsys):
    folder = shared_data / "gre" / "romeo_small"
    magnitude, affine = io.load_image(folder / "Mag.nii", ndim=4)
    phase, _ = io.load_image(folder / "Phase.nii", ndim=4)
    gre = io.GRE(magnitude, phase, affine, [0.004, 0.008, 0.012], 3.0, source=str(folder))
    result = qsm.reconstruct_qsm(gre, qsm.QSMOptions(unwrap="path", background="pdf", inversion="tv"))
    chi = result.susceptibility[result.mask]
    with capsys.disabled():
        print(
            f"\n  ROMEO GRE: {result.parameters['phase_scaling']}; mask {result.mask.sum()} voxels; "
            f""
            f"χ 1st/50th/99th percentile "
            f"{np.percentile(chi, 1):.3f}/{np.median(chi):.3f}/{np.percentile(chi, 99):.3f} ppm"
        )
    assert "rescaled" in result.parameters["phase_scaling"]
    assert np.all(np.isfinite(result.susceptibility)) and result.mask.sum() > 1000
    assert -0.5 < np.percentile(chi, 1) and np.percentile(chi, 99) < 0.5  # brain tissue lies within ±0.5 ppm


def test_qsm_command_writes_outputs_with_input_geometry(tmp_path, capsys):
    config = phantom.with_overrides(SMALL, gre_tilt_deg=10.0)
    subject = phantom.simulate_subject("control", 34, config)
    phantom.write_subject(tmp_path / "ds", "sub-01", subject, config)
    anat = tmp_path / "ds" / "sub-01" / "anat"
    out = tmp_path / "qsm"
    code = cli.main(
        [
            "qsm",
            "--magnitude",
            str(anat / "sub-01_part-mag_T2starw.nii.gz"),
            "--phase",
            str(anat / "sub-01_part-phase_T2starw.nii.gz"),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    for name in ("susceptibility", "local_field", "mask"):
        data, affine = io.load_image(out / f"{name}.nii.gz")
        assert data.shape == subject.gre.phase.shape[:3]
        np.testing.assert_allclose(affine, subject.gre.affine, atol=1e-5)
    record = io.read_json(out / "provenance.json")
    assert record["results"]["echo_times_s"] == [0.015] and record["options"]["inversion"] == "tv"
    assert record["results"]["reference"] == "the mean over the brain mask"
    assert io.read_json(out / "susceptibility.json") == {
        "Units": "ppm",
        "Reference": "the mean over the brain mask",
        "ReferenceOption": "whole-brain",
    }
    assert "phase_1_sidecar" in record["inputs"]  # echo time, field strength and units came from it
    assert record["results"]["phase_scaling"].startswith("radians (the sidecar's Units")
    np.testing.assert_allclose(
        record["results"]["b0_direction_voxel"], [0, np.sin(np.deg2rad(10)), np.cos(np.deg2rad(10))], atol=1e-6
    )
    assert (
        cli.main(
            [
                "qsm",
                "--magnitude",
                str(anat / "sub-01_part-mag_T2starw.nii.gz"),
                "--phase",
                str(anat / "sub-01_part-phase_T2starw.nii.gz"),
                "--te",
                "15",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    mixed = ["qsm", "--magnitude", str(anat / "sub-01_part-mag_T2starw.nii.gz"), "--out", str(tmp_path / "mixed")]
    assert cli.main(mixed + ["--imaginary", str(anat / "sub-01_part-phase_T2starw.nii.gz")]) == 2
    assert "give magnitude and phase, or real and imaginary parts" in capsys.readouterr().err
    assert not (tmp_path / "mixed").exists()


def test_tv_gradient_and_its_adjoint():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 7, 5)).astype(np.float32)
    y = [rng.normal(size=(6, 7, 5)).astype(np.float32) for _ in range(3)]
    voxel_size = (0.5, 0.7, 2.0)
    gradient = qsm._gradient(x, voxel_size)
    for axis in range(3):
        np.testing.assert_allclose(gradient[axis], (np.roll(x, -1, axis=axis) - x) / voxel_size[axis], atol=1e-5)
    lhs = sum(float(np.vdot(g, v)) for g, v in zip(gradient, y))
    assert lhs == pytest.approx(float(np.vdot(x, qsm._divergence_adjoint(y, voxel_size))), rel=1e-4)


def test_brain_mask_matches_the_phantom_brain():
    subject = phantom.simulate_subject("control", 35, SMALL)
    voxel_size = geometry.voxel_sizes(subject.gre.affine)
    head = subject.truth_gre["label"] > 0  # brain and its CSF shell
    mask = masks.brain_mask(subject.gre.magnitude, voxel_size, erosion_mm=0.0)
    dice = 2 * np.sum(mask & head) / (mask.sum() + head.sum())
    assert dice > 0.95, dice
    eroded = masks.brain_mask(subject.gre.magnitude, voxel_size, erosion_mm=4.0)
    assert eroded.sum() < mask.sum() and not np.any(eroded & ~mask)


def test_whole_chain_ranks_subjects_by_their_m1_susceptibility(capsys):
    """The default chain (path unwrapping, LBV, TV free outside the mask, one Bregman iteration) on single-echo
    phantoms (not evidence: real anatomy is in test_anatomy and benchmarks/bench_real_anatomy.py): M1 is thin
    cortex at the brain's edge, where background removal takes part of its own field, so its mean comes out low;
    what a biomarker needs is that subjects keep their order, which a high correlation with the truth shows. Deep
    grey matter, away from the edge, keeps its value."""
    truth, measured, deep = [], [], []
    for seed in range(50, 56):
        subject = phantom.simulate_subject(phantom.GROUPS[seed % 2], seed, SMALL)
        result = qsm.reconstruct_qsm(subject.gre)
        m1 = np.isin(subject.truth_gre["label"], phantom.REGIONS["M1"]) & result.mask
        chi = qsm.reference(subject.truth_gre["chi"], result.mask)
        truth.append(chi[m1].mean())
        measured.append(result.susceptibility[m1].mean())
        nuclei = np.isin(subject.truth_gre["label"], (phantom.DEEP_GM_LEFT, phantom.DEEP_GM_RIGHT)) & result.mask
        deep.append(result.susceptibility[nuclei].mean() / chi[nuclei].mean())
    truth, measured = np.array(truth), np.array(measured)
    slope, intercept = np.polyfit(truth, measured, 1)
    correlation = np.corrcoef(truth, measured)[0, 1]
    with capsys.disabled():
        print(
            f"\n  whole chain, M1 mean over 6 subjects: correlation with the truth {correlation:.3f}, slope "
            f"{slope:.2f}, "
            f"intercept {intercept:+.3f} ppm, mean error {np.mean(measured - truth):+.3f} ppm; deep grey matter "
            f"{min(deep):.3f}-{max(deep):.3f} x the truth"
        )
    # measured 0.972-1.031 x (V-SHARP 0.967-0.988 x; 1.018-1.048 x with TV penalised outside the mask; the issue's
    # target: within 10 %)
    assert all(abs(ratio - 1) < 0.1 for ratio in deep), deep
    assert correlation > 0.9  # measured 0.999 (V-SHARP 0.997; 0.999 penalised outside the mask; Laplacian 0.995)
    # measured 0.92 (V-SHARP 0.88; penalised outside the mask 0.87; the Laplacian 0.73; 0.69 before the phantom had
    # sulci; 0.61 with V-SHARP radii down to 4 mm only): the cortex is underestimated
    assert 0.5 < slope < 1.2


def test_tv_with_chi_free_outside_the_mask_keeps_the_cortex_and_takes_up_a_harmonic_residual():
    """A brain (a 40 mm sphere) with a 4 mm cortex of 0.1 ppm on one side and two nuclei; its true local field plus
    a harmonic residual (the field of an air ball 12 mm beyond the brain, at 0.2 of its strength: what background
    removal leaves). Penalised outside the mask, TV pays for the cortex's step to the zero it assumes beyond the
    mask and folds the residual into χ (measured: cortex 0.64 x its truth without the residual, 0.62 x with it,
    NRMSE 49 % and 55 %); free outside, sources there take up the residual and the step costs nothing (0.92 x both,
    NRMSE 19.0 % and 20.5 %)."""
    x = (np.arange(64) - 31.5) * 2.0
    x, y, z = np.meshgrid(x, x, x, indexing="ij")
    radius = np.sqrt(x**2 + y**2 + z**2)
    brain = radius < 40
    cortex = brain & (radius > 36) & (x > 0)
    chi = 0.1 * cortex + 0.15 * (np.sqrt((x - 12) ** 2 + y**2 + z**2) < 8)
    chi -= 0.05 * (np.sqrt((x + 12) ** 2 + y**2 + z**2) < 8)
    air = np.sqrt(x**2 + y**2 + (z + 52) ** 2) < 8
    local = dipole.forward_field(chi, (2, 2, 2))
    residual = 0.2 * dipole.forward_field(-9.0 * air, (2, 2, 2))
    assert np.std(residual[brain]) > np.std(local[brain])  # larger than the local field itself
    truth = qsm.reference(chi, brain)
    scores = {}
    for outside in qsm.TV_OUTSIDE:
        for name, field in (("clean", local), ("residual", local + residual)):
            estimate = qsm.reference(qsm.dipole_inversion(field, brain, (2, 2, 2), outside=outside), brain)
            scores[outside, name] = (
                estimate[cortex].mean() / truth[cortex].mean(),
                metrics.nrmse(estimate, truth, brain),
            )
    for name in ("clean", "residual"):
        cortex_ratio, nrmse = scores["free", name]
        assert cortex_ratio > 0.85 and nrmse < 25, scores
        assert scores["penalised", name][0] < 0.7 and scores["penalised", name][1] > 2 * nrmse, scores
    # the residual is mostly taken up: it costs free TV 1.5 points of NRMSE, penalised TV 5.9
    cost = {outside: scores[outside, "residual"][1] - scores[outside, "clean"][1] for outside in qsm.TV_OUTSIDE}
    assert cost["free"] < 3 and cost["free"] < 0.5 * cost["penalised"], scores
    with pytest.raises(InputError, match="outside the mask 'none'"):
        qsm.dipole_inversion(local, brain, (2, 2, 2), outside="none")


def test_tv_weight_trades_noise_against_detail_and_reaches_the_inversion():
    """`--tv-weight` scales the TV inversion's α: on a noise-free field a small weight is closer to the truth, on a
    noisy one a large weight (the phantom's true local field, with white noise of 0.006 ppm added: the phase noise of
    SNR 13 at TE 15 ms, 3 T); the chain passes it to the inversion and records the α used; a weight that is not
    positive is refused by name."""
    gre, _, voxel_size, mask, chi, local = true_local_field(SMALL)
    noisy = local + np.random.default_rng(0).normal(0.0, 0.006, local.shape).astype(np.float32)
    truth = qsm.reference(chi, mask)
    default = qsm.TV_WEIGHT / float(np.mean(voxel_size))

    def error(field, weight, outside="free"):
        estimate = qsm.dipole_inversion(
            field, mask, voxel_size, b0_direction=gre.b0_direction, regularization=weight * default, outside=outside
        )
        return metrics.nrmse(qsm.reference(estimate, mask), truth, mask)

    # measured, χ free outside the mask (the default): clean 27.1 % (x0.25: 14.6 % after 100 iterations instead of
    # 40), 14.0 % (x1), 27.1 % (x4); noisy 78.2 %, 47.7 %, 30.7 %. Penalised outside the mask: clean 12.9 %,
    # 15.3 %, 22.2 %; noisy 74.5 %, 41.2 %, 24.7 %. (On real anatomy and qsm-forward's cylinders the free form is
    # the more accurate: `test_whole_chain_on_qsm_forwards_cylinders`, README.)
    assert error(local, 1.0) < error(local, 4.0)
    assert error(local, 0.25, "penalised") < error(local, 1.0, "penalised") < error(local, 4.0, "penalised")
    assert error(noisy, 4.0) < error(noisy, 1.0) < error(noisy, 0.25)
    result = qsm.reconstruct_qsm(gre, qsm.QSMOptions(tv_weight=2.5))
    assert result.parameters["inversion_options"]["regularization"] == pytest.approx(2.5 * default)
    with pytest.raises(InputError, match="--tv-weight"):
        qsm.reconstruct_qsm(gre, qsm.QSMOptions(tv_weight=0.0))


def _with_noise(gre, sigma, seed):
    """`gre` (taken as noise-free) with complex Gaussian noise of SD `sigma` in each channel."""
    rng = np.random.default_rng(seed)
    signal = gre.magnitude * np.exp(1j * gre.phase)
    signal = signal + rng.normal(0.0, sigma, signal.shape) + 1j * rng.normal(0.0, sigma, signal.shape)
    return dataclasses.replace(gre, magnitude=np.abs(signal).astype(np.float32), phase=np.angle(signal))


def _inside(mask):
    """Index of the central half of `mask`'s bounding box (inside the brain: a crop with no background)."""
    spans = [np.flatnonzero(mask.any(axis=a)) for a in ((1, 2), (0, 2), (0, 1))]
    return np.ix_(*[np.arange(lo + (hi - lo) // 4, hi - (hi - lo) // 4) for lo, hi in ((s[0], s[-1]) for s in spans)])


def test_noise_is_read_from_the_background_and_carried_to_the_field():
    """`magnitude_noise` against the noise added (the phantom's background is air), and `field_noise` against the
    field's own noise: two noise draws on one subject differ by √2 × its SD, for one echo and for three (measured:
    noise 0.995 and 0.999 x the noise added; field noise predicted 0.00428 and 0.0122 ppm, measured 0.00453 and
    0.0130: three echoes at 5, 10, 15 ms are noisier than one at 15 ms, for the receiver offset taken from them)."""
    for echo_times in ((0.015,), (0.005, 0.010, 0.015)):
        config = phantom.with_overrides(SMALL, echo_times=echo_times, snr_gre=2000.0)
        gre = phantom.simulate_subject("control", 33, config).gre
        voxel_size = geometry.voxel_sizes(gre.affine)
        mask = masks.brain_mask(gre.magnitude, voxel_size)
        sigma = 0.05 * np.median(gre.magnitude[..., 0][mask])  # white-matter-like SNR of about 20
        first, second = _with_noise(gre, sigma, 1), _with_noise(gre, sigma, 2)
        estimate = qsm.magnitude_noise(first.magnitude[..., 0], voxel_size)
        assert estimate == pytest.approx(sigma, rel=0.03), (echo_times, estimate, sigma)
        fields = [
            qsm.combine_echoes(g.phase, g.magnitude, echo_times, 3.0, mask=mask, unwrap="path", voxel_size=voxel_size)
            for g in (first, second)
        ]
        predicted = qsm.field_noise(first.magnitude, echo_times, 3.0, mask, estimate)
        difference = (fields[0] - fields[1])[mask]
        # a few voxels are unwrapped a turn apart in the two draws (a turn of the phase at TE, or of the echoes'
        # difference at ΔTE): that is not noise
        spacing = echo_times[0] if len(echo_times) == 1 else echo_times[1] - echo_times[0]
        turn = 1e6 / (dipole.GYROMAGNETIC_RATIO_HZ_PER_T * 3.0 * spacing)  # ppm
        turns = np.round(difference / turn)
        assert np.mean(turns != 0) < 0.005
        measured = np.std(difference - turn * turns) / np.sqrt(2)
        assert predicted == pytest.approx(measured, rel=0.1), (echo_times, predicted, measured)
    assert qsm.magnitude_noise(first.magnitude[_inside(mask)][..., 0], voxel_size) is None  # a crop: no background


def test_tv_weight_from_the_noise_follows_it_and_falls_back_without_a_background():
    """``--tv-weight-from noise``: the weight in proportion to the field's noise (`TV_NOISE_PPM`), so a noisy scan is
    regularised more and its map is closer to the truth than with the default weight (the phantom, a unit-test
    tool, SNR 10, field noise 0.0079 ppm: measured NRMSE 70.8 % against 100.1 %); without a background to read the
    noise from, the default weight with a warning. (Measured on real anatomy: README.)"""
    config = phantom.with_overrides(SMALL, snr_gre=10.0)
    subject = phantom.simulate_subject("ALS", 32, config)
    gre, truth = subject.gre, subject.truth_gre["chi"]
    voxel_size = geometry.voxel_sizes(gre.affine)
    default = qsm.TV_WEIGHT / float(np.mean(voxel_size))
    errors = {}
    for source in qsm.TV_WEIGHT_FROM:
        result = qsm.reconstruct_qsm(gre, qsm.QSMOptions(tv_weight_from=source))
        noise = result.parameters["field_noise_ppm"]
        expected = qsm.TV_WEIGHT * noise / qsm.TV_NOISE_PPM if source == "noise" else default
        assert result.parameters["inversion_options"]["regularization"] == pytest.approx(expected)
        errors[source] = metrics.nrmse(result.susceptibility, qsm.reference(truth, result.mask), result.mask)
    assert noise > 2 * qsm.TV_NOISE_PPM and errors["noise"] < 0.9 * errors["default"], (noise, errors)
    inside = _inside(result.brain_mask)
    crop = io.GRE(gre.magnitude[inside], gre.phase[inside], gre.affine, gre.echo_times, 3.0, source="crop")
    result = qsm.reconstruct_qsm(crop, qsm.QSMOptions(tv_weight_from="noise"))
    assert result.parameters["field_noise_ppm"] is None
    assert result.parameters["inversion_options"]["regularization"] == pytest.approx(default)
    assert any("no background" in w for w in result.parameters["warnings"])


def test_bregman_iterations_let_the_noise_back_and_reach_the_inversion():
    """`--tv-bregman`: each iteration adds back the field χ leaves unexplained, noise included. On the phantom's
    true local field (a unit-test tool) measured: noise-free 14.0 % NRMSE, 14.7 % (one iteration), 13.0 % (two);
    with noise of 0.006 ppm (SNR 13 at TE 15 ms) 47.7 %, 75.7 %, 90.5 %: for clean, high-SNR data only (the
    contrast it restores: `test_whole_chain_on_qsm_forwards_cylinders`). The chain passes and records it; a
    negative count is refused by name."""
    gre, _, voxel_size, mask, chi, local = true_local_field(SMALL)
    noisy = local + np.random.default_rng(0).normal(0.0, 0.006, local.shape).astype(np.float32)
    truth = qsm.reference(chi, mask)

    def error(field, bregman):
        estimate = qsm.dipole_inversion(field, mask, voxel_size, b0_direction=gre.b0_direction, bregman=bregman)
        return metrics.nrmse(qsm.reference(estimate, mask), truth, mask)

    assert error(local, 1) < 1.1 * error(local, 0)
    assert error(noisy, 1) > 1.3 * error(noisy, 0)
    result = qsm.reconstruct_qsm(gre, qsm.QSMOptions(tv_bregman=0))
    assert result.parameters["inversion_options"]["bregman"] == 0
    with pytest.raises(InputError, match="--tv-bregman"):
        qsm.reconstruct_qsm(gre, qsm.QSMOptions(tv_bregman=-1))


def test_tv_without_a_penalty_across_the_magnitudes_edges_keeps_a_thin_cortex():
    """MEDI's morphology prior: a sphere (-0.03 ppm) with a 3 mm shell of 0.1 ppm (a cortex) and a nucleus of
    0.15 ppm, local field by the dipole model plus noise of 0.002 ppm. `magnitude_edges` on a piecewise-constant
    magnitude finds exactly the gradient components that cross a boundary inside the mask; TV without a penalty
    there reads the shell at its truth where plain TV reads it low. Measured with χ free outside the mask (the
    default): plain TV 0.761 x, NRMSE 25.9 %; exact edges 1.034 x, 4.5 %; edges from a noisy magnitude (noise 0.02
    against steps of 0.1-0.2; the default fraction) 1.013 x, 2.9 %. Penalised outside the mask: 0.900 x and 11.5 %,
    0.983 x and 3.9 %, 0.979 x and 4.6 %. A uniform spherical shell is what freeing χ outside the mask handles
    worst: its field inside the inner sphere is zero, so only its own voxels see it, and with its step to what lies
    beyond the mask unpenalised nothing else pins its value. The chain records the option."""
    n = 48
    x, y, z = np.indices((n, n, n)) - n / 2 + 0.5
    radius = np.sqrt(x**2 + y**2 + z**2)
    mask = radius < 20
    shell = mask & (radius >= 17)
    nucleus = np.sqrt((x - 6) ** 2 + y**2 + z**2) < 4
    chi = np.where(mask, -0.03, 0.0) + 0.13 * shell + 0.18 * nucleus
    field = dipole.forward_field(chi, (1, 1, 1)) + np.random.default_rng(0).normal(0, 0.002, mask.shape)
    magnitude = np.where(mask, 0.5, 0.0) + 0.2 * shell + 0.1 * nucleus
    pairs = np.stack([mask & np.roll(mask, -1, axis=axis) for axis in range(3)])  # both voxels in the mask
    crossing = (np.stack(qsm._gradient(magnitude.astype(np.float32), (1, 1, 1))) != 0) & pairs
    edges = qsm.magnitude_edges(magnitude, mask, (1, 1, 1), crossing.sum() / pairs.sum())
    assert np.array_equal(edges, crossing)
    truth = qsm.reference(chi, mask)

    def inverted(found):
        return qsm.reference(qsm.dipole_inversion(field, mask, (1, 1, 1), edges=found), mask)

    plain, exact = inverted(None), inverted(edges)
    assert plain[shell].mean() / truth[shell].mean() < 0.93
    assert exact[shell].mean() / truth[shell].mean() == pytest.approx(1.0, abs=0.05)
    noisy = magnitude + np.random.default_rng(1).normal(0, 0.02, mask.shape)
    found = inverted(qsm.magnitude_edges(noisy, mask, (1, 1, 1), qsm.TV_EDGE_FRACTION))
    assert found[shell].mean() / truth[shell].mean() == pytest.approx(1.0, abs=0.05)
    assert metrics.nrmse(found, truth, mask) < 0.6 * metrics.nrmse(plain, truth, mask)
    gre = io.GRE(magnitude[..., None], dipole.field_ppm_to_phase(field, 0.015, 3.0)[..., None], np.eye(4), [0.015], 3.0)
    with_edges = qsm.reconstruct_qsm(gre, qsm.QSMOptions(tv_edges="magnitude"), mask=mask)
    assert with_edges.parameters["tv_edges"].startswith("magnitude (")
    assert qsm.reconstruct_qsm(gre, mask=mask).parameters["tv_edges"] == "none"


CYLINDERS_PPM = (0.05, 0.1, 0.2, 0.5)


def qsm_forward_cylinders(folder, echo_times, receiver_offset):
    """qsm-forward's cylinder phantom (Stewart et al.; cylinders of `CYLINDERS_PPM` in a large one of 0.005 ppm,
    perpendicular to B0; 1 mm, 3 T, peak SNR 50, its shim field, its receiver phase offset if asked), written as
    BIDS by qsm-forward and read back: (GRE, true χ, mask)."""
    qsm_forward = pytest.importorskip("qsm_forward")
    chi = qsm_forward.generate_susceptibility_phantom(
        resolution=[100, 100, 100],
        background=0,
        large_cylinder_val=0.005,
        small_cylinder_radii=[4, 4, 4, 7],
        small_cylinder_vals=list(CYLINDERS_PPM),
    )
    recon = qsm_forward.ReconParams(
        subject="cyl",
        TEs=np.array(echo_times),
        B0=3,
        B0_dir=np.array([1, 0, 0]),
        peak_snr=50,
        random_seed=42,
        generate_phase_offset=receiver_offset,
        voxel_size=np.array([1.0, 1.0, 1.0]),
    )
    qsm_forward.generate_bids(qsm_forward.TissueParams(chi=chi), recon, str(folder))
    anat, truth_dir = folder / "sub-cyl" / "anat", folder / "derivatives" / "qsm-forward" / "sub-cyl" / "anat"
    if len(echo_times) == 1:
        names = ["sub-cyl_part-{}_T2starw.nii"]
    else:
        names = [f"sub-cyl_echo-{n}_part-{{}}_MEGRE.nii" for n in range(1, len(echo_times) + 1)]
    magnitude, phase = (
        np.stack([io.load_image(anat / name.format(part), ndim=3)[0] for name in names], axis=-1)
        for part in ("mag", "phase")
    )
    truth, _ = io.load_image(truth_dir / "sub-cyl_Chimap.nii", ndim=3)
    mask = io.load_image(truth_dir / "sub-cyl_mask.nii", ndim=3)[0] > 0
    # qsm-forward's B0 lies along the first voxel axis: an affine that puts that axis along the scanner's z
    affine = np.array([[0, 0, 1.0, 0], [0, 1.0, 0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1]])
    return io.GRE(magnitude, phase, affine, np.array(echo_times), 3.0, source="qsm-forward"), truth, mask


def cylinder_scores(gre, truth, mask, unwrap, **options):
    """Whole chain (TV inversion; `options` of `qsm.QSMOptions`): NRMSE (%) and each cylinder's mean over its
    truth."""
    options = qsm.QSMOptions(unwrap=unwrap, **options)
    result = qsm.reconstruct_qsm(gre, options, mask=mask)
    inside = result.mask
    estimate, reference = qsm.reference(result.susceptibility, inside), qsm.reference(truth, inside)
    ratios = []
    for value in CYLINDERS_PPM:
        core = ndimage.binary_erosion(np.isclose(truth, value)) & inside
        ratios.append(estimate[core].mean() / reference[core].mean())
    return metrics.nrmse(estimate, reference, inside), ratios


def test_whole_chain_on_qsm_forwards_cylinders(tmp_path):
    """A peer's simulator (qsm-forward), single echo TE 15 ms, no receiver offset; whole chain from the wrapped
    phase. Measured: the default (path unwrapping, LBV, TV with χ free outside the mask, one Bregman iteration)
    2.5 % NRMSE, cylinders 1.04, 0.99, 1.01, 1.00 x their truth; with V-SHARP 19.8 %, 0.97, 1.00, 0.99, 1.00.
    Without the Bregman iteration TV keeps the faint cylinder low: LBV 4.3 %, 0.87, 0.92, 0.97, 1.00; V-SHARP
    16.5 %, 0.81, 0.96, 0.95, 0.99. TV penalised outside the mask as well (the default before stop 40): V-SHARP
    22.5 %, 0.44, 1.01, 0.92, 0.95; LBV 10.4 %. Laplacian unwrapping 72.6 % (V-SHARP, penalised), 0.09, 1.02, 0.77,
    0.56: it smooths away the real phase steps at the cylinders' edges."""
    gre, truth, mask = qsm_forward_cylinders(tmp_path, [0.015], receiver_offset=False)
    nrmse, ratios = cylinder_scores(gre, truth, mask, "path")
    assert nrmse < 3.5 and all(abs(r - 1) < 0.06 for r in ratios), (nrmse, ratios)
    vsharp = cylinder_scores(gre, truth, mask, "path", background="vsharp")
    assert vsharp[0] < 21 and all(abs(r - 1) < 0.06 for r in vsharp[1]), vsharp
    plain = cylinder_scores(gre, truth, mask, "path", background="vsharp", tv_bregman=0)
    assert plain[0] < 20 and all(abs(r - 1) < 0.1 for r in plain[1][1:]) and 0.7 < plain[1][0] < 0.9, plain
    lbv_plain = cylinder_scores(gre, truth, mask, "path", tv_bregman=0)
    assert lbv_plain[0] < 8 and all(abs(r - 1) < 0.1 for r in lbv_plain[1][1:]) and lbv_plain[1][0] > 0.75, lbv_plain
    penalised = cylinder_scores(gre, truth, mask, "path", background="vsharp", tv_outside="penalised", tv_bregman=0)
    assert penalised[0] > plain[0] + 4 and penalised[1][0] < plain[1][0] - 0.2, penalised
    laplacian = cylinder_scores(
        gre, truth, mask, "laplacian", background="vsharp", tv_outside="penalised", tv_bregman=0
    )
    assert laplacian[0] > 50 and laplacian[1][-1] < 0.7, laplacian


def test_the_receiver_offset_is_removed_with_echoes_and_not_without(tmp_path):
    """qsm-forward's receiver phase offset (smooth, not harmonic): with three echoes (5, 10, 15 ms) the echo
    combination removes it and the chain comes near the offset-free single echo's result: measured without Bregman
    16.1 % NRMSE, cylinders 0.67, 0.95, 0.95, 1.00, either unwrapping (23.5 % with TV penalised outside the mask);
    with the default Bregman iteration 22.7 %, 0.53, 0.92, 0.94, 0.99: the offset's removal roughly triples the
    field's noise, which Bregman lets back. From one echo nothing can tell the offset from the field (measured
    88.9 % with path unwrapping, the 0.05 ppm cylinder at 2.7 x; TV with χ free outside the mask takes up only the
    offset's harmonic part: 88.7 % penalised). All with V-SHARP."""
    gre, truth, mask = qsm_forward_cylinders(tmp_path / "three", [0.005, 0.010, 0.015], receiver_offset=True)
    nrmse, ratios = cylinder_scores(gre, truth, mask, "laplacian", background="vsharp", tv_bregman=0)
    assert nrmse < 20 and all(abs(r - 1) < 0.1 for r in ratios[1:]), (nrmse, ratios)
    nrmse, ratios = cylinder_scores(gre, truth, mask, "laplacian", background="vsharp")
    assert nrmse < 25 and all(abs(r - 1) < 0.1 for r in ratios[1:]), (nrmse, ratios)
    gre, truth, mask = qsm_forward_cylinders(tmp_path / "one", [0.015], receiver_offset=True)
    assert cylinder_scores(gre, truth, mask, "path", background="vsharp")[0] > 50
