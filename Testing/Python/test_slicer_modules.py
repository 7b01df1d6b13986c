"""The Slicer modules: their logic on real MRML (slicer-core, no Qt) against the phantom's truth, and static checks of
the module files (.ui, parameter nodes, CMake lists) that Slicer itself would only find at build or load time."""

import ast
import dataclasses
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import replace
from importlib import metadata

import numpy as np
import pytest
from conftest import MODULE_NAMES, MODULES_DIR, PROJECT_ROOT, random_rotation, write_nrrd_in_frame

from ALSQuantLib import io, phantom, stats
from ALSQuantLib.atlas import LabelingOptions
from ALSQuantLib.dki import DKIOptions
from ALSQuantLib.errors import InputError
from ALSQuantLib.qsm import QSMOptions

PANELS = MODULE_NAMES[1:]


@pytest.fixture(scope="module")
def subject():
    """One simulated ALS subject, three echoes (so multi-echo inputs are exercised)."""
    return phantom.simulate_subject(
        "ALS", 21, phantom.with_overrides(phantom.PhantomConfig(), echo_times=(0.005, 0.010, 0.015))
    )


def _ijk_to_ras(node):
    from ALSQuantCommonLib import nodes

    return nodes.ijkToRas(node)


# ----------------------------------------------------------------------------------------------------------------
# Logic on real MRML
# ----------------------------------------------------------------------------------------------------------------
def test_dwi_node_round_trip_honours_the_measurement_frame(module_logic, mrml_scene, subject):
    import slicer

    from ALSQuantCommonLib import nodes

    node = nodes.dwiNodeFromDWI(mrml_scene, subject.dwi, "dwi")
    assert node.IsA("vtkMRMLDiffusionWeightedVolumeNode")
    back = nodes.dwiFromNode(node)
    np.testing.assert_array_equal(back.data, subject.dwi.data)
    np.testing.assert_allclose(back.bvecs, subject.dwi.bvecs, atol=1e-6)
    # The same RAS gradients stored in a rotated measurement frame: g_frame = Rᵀ g_RAS.
    angle = np.deg2rad(30)
    rotation = np.eye(4)
    rotation[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    node.SetMeasurementFrameMatrix(slicer.util.vtkMatrixFromArray(rotation))
    for i, g in enumerate(subject.dwi.bvecs):
        node.SetDiffusionGradient(i, list(rotation[:3, :3].T @ g))
    np.testing.assert_allclose(nodes.dwiFromNode(node).bvecs, subject.dwi.bvecs, atol=1e-6)


def test_nrrd_read_by_slicer_gives_the_gradients_alsquant_reads(module_logic, mrml_scene, subject, tmp_path):
    # An NRRD DWI with an oblique, asymmetric measurement frame, read by Slicer's own NRRD reader into a DWI node and
    # taken through the node path, and read from the file by ALSQuantLib: the same RAS gradients, the true ones.
    import slicer

    from ALSQuantCommonLib import nodes

    path = tmp_path / "dwi.nrrd"
    write_nrrd_in_frame(subject.dwi, path, random_rotation(np.random.default_rng(11)))
    node = mrml_scene.AddNewNodeByClass("vtkMRMLDiffusionWeightedVolumeNode")
    storage = slicer.vtkMRMLNRRDStorageNode()
    mrml_scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1
    from_slicer, from_file = nodes.dwiFromNode(node), io.read_dwi(path)
    np.testing.assert_allclose(from_slicer.bvecs, subject.dwi.bvecs, atol=1e-6)
    np.testing.assert_allclose(from_file.bvecs, from_slicer.bvecs, atol=1e-6)
    np.testing.assert_allclose(from_file.bvals, from_slicer.bvals, rtol=1e-6)
    np.testing.assert_allclose(from_file.affine, from_slicer.affine, atol=1e-5)
    np.testing.assert_array_equal(from_file.data, from_slicer.data)


def test_dki_logic_makes_maps_on_the_dwi_grid_near_the_truth(module_logic, mrml_scene, subject, tmp_path):
    from ALSQuantCommonLib import nodes
    from DKIReconstructionLib.logic import DKIReconstructionLogic

    dwi_node = nodes.dwiNodeFromDWI(mrml_scene, subject.dwi, "dwi")
    logic = DKIReconstructionLogic(mrml_scene)
    maps = logic.process(dwi_node, workdir=tmp_path / "dki")
    assert set(maps) == {"mk", "fa", "md"}
    cst = np.isin(subject.truth_dwi["label"], phantom.REGIONS["CST"])
    for name, node in maps.items():
        assert node.GetClassName() == "vtkMRMLScalarVolumeNode"
        np.testing.assert_array_equal(_ijk_to_ras(node), _ijk_to_ras(dwi_node))
        values, _ = nodes.imageFromVolume(node)
        assert np.median(values[cst]) == pytest.approx(np.median(subject.truth_dwi[name][cst]), rel=0.04), name
    # The panel's way: the job followed, not waited for; options reach the command (OLS differs from WLS).
    job = logic.process(dwi_node, DKIOptions(fit_method="OLS"), wait=False)
    folder = job.temporary
    assert (folder / "dwi.nii.gz").is_file() and "--fit-method" in job.task.arguments
    assert job.task.wait(600) == 0
    assert job.task.progress == 1.0 and any("DKI" in line or "fit" in line for line in job.task.log)
    ols = job.finish()
    assert not folder.exists()  # the DWI copy and the command's outputs are deleted once loaded
    for name, node in ols.items():
        np.testing.assert_array_equal(_ijk_to_ras(node), _ijk_to_ras(dwi_node))
        values = nodes.imageFromVolume(node)[0]
        assert np.median(values[cst]) == pytest.approx(np.median(subject.truth_dwi[name][cst]), rel=0.05), name
    assert not np.array_equal(nodes.imageFromVolume(ols["mk"])[0], nodes.imageFromVolume(maps["mk"])[0])
    record = io.read_json(tmp_path / "dki" / "out" / "provenance.json")  # the kept work folder of the first run
    assert record["step"] == "dki" and record["options"] == dataclasses.asdict(DKIOptions())
    with pytest.raises(ValueError, match="maps"):
        logic.process(dwi_node, maps=["mk", "bogus"])


def test_qsm_logic_per_echo_nodes_and_a_vector_volume_agree(module_logic, mrml_scene, subject):
    from ALSQuantCommonLib import nodes
    from QSMReconstructionLib.logic import QSMReconstructionLogic

    gre = subject.gre
    magnitude = [nodes.volumeFromImage(mrml_scene, gre.magnitude[..., e], gre.affine, f"mag{e}") for e in range(3)]
    phase = [nodes.volumeFromImage(mrml_scene, gre.phase[..., e], gre.affine, f"phase{e}") for e in range(3)]
    logic = QSMReconstructionLogic(mrml_scene)
    out = logic.process(magnitude, phase, gre.echo_times, gre.field_strength)
    assert out["susceptibility"].GetClassName() == "vtkMRMLScalarVolumeNode"
    assert out["mask"].GetClassName() == "vtkMRMLLabelMapVolumeNode"
    for node in out.values():
        np.testing.assert_array_equal(_ijk_to_ras(node), _ijk_to_ras(phase[0]))
    chi, _ = nodes.imageFromVolume(out["susceptibility"])
    mask = nodes.imageFromVolume(out["mask"])[0] > 0
    m1 = np.isin(subject.truth_gre["label"], phantom.REGIONS["M1"]) & mask
    deep = np.isin(subject.truth_gre["label"], (phantom.DEEP_GM_LEFT, phantom.DEEP_GM_RIGHT)) & mask
    assert 0 < chi[m1].mean() < subject.values["m1_chi"]  # paramagnetic cortex, underestimated (see test_qsm)
    assert chi[deep].mean() == pytest.approx(
        subject.truth_gre["chi"][deep].mean() - subject.truth_gre["chi"][mask].mean(), abs=0.03
    )
    vector_mag = nodes.volumeFromImage(
        mrml_scene, gre.magnitude, gre.affine, "mag", className="vtkMRMLVectorVolumeNode"
    )
    vector_phase = nodes.volumeFromImage(
        mrml_scene, gre.phase, gre.affine, "phase", className="vtkMRMLVectorVolumeNode"
    )
    assert vector_phase.GetImageData().GetNumberOfScalarComponents() == 3
    again = logic.process(vector_mag, vector_phase, gre.echo_times, gre.field_strength)
    np.testing.assert_array_equal(nodes.imageFromVolume(again["susceptibility"])[0], chi)
    with pytest.raises(Exception, match="millisecond"):
        logic.process(magnitude, phase, [5, 10, 15], gre.field_strength)
    # Real and imaginary parts (GE, Philips), with the phase's sign inverted: the same map once the sign is given.
    z = gre.magnitude * np.exp(-1j * gre.phase)
    real = nodes.volumeFromImage(mrml_scene, z.real, gre.affine, "re", className="vtkMRMLVectorVolumeNode")
    imaginary = nodes.volumeFromImage(mrml_scene, z.imag, gre.affine, "im", className="vtkMRMLVectorVolumeNode")
    inverted = QSMOptions(phase_sign="-1")
    parts = logic.process(
        None, None, gre.echo_times, gre.field_strength, inverted, realNodes=real, imaginaryNodes=imaginary
    )
    from_parts = nodes.imageFromVolume(parts["susceptibility"])[0]
    assert np.corrcoef(from_parts[mask], chi[mask])[0, 1] > 0.999
    with pytest.raises(Exception, match="magnitude and phase, or real and imaginary"):
        logic.process(magnitude, None, gre.echo_times, gre.field_strength, realNodes=real)


def test_background_task_cancel_stops_the_process(module_logic, mrml_scene, subject):
    from ALSQuantCommonLib import nodes
    from QSMReconstructionLib.logic import QSMReconstructionLogic

    gre = subject.gre
    magnitude = nodes.volumeFromImage(mrml_scene, gre.magnitude, gre.affine, "mag", className="vtkMRMLVectorVolumeNode")
    phase = nodes.volumeFromImage(mrml_scene, gre.phase, gre.affine, "phase", className="vtkMRMLVectorVolumeNode")
    logic = QSMReconstructionLogic(mrml_scene)
    job = logic.process(magnitude, phase, gre.echo_times, gre.field_strength, QSMOptions(unwrap="path"), wait=False)
    folder = job.temporary
    logic.cancel()  # what the panel's cleanup does
    assert not job.task.running and job.task.cancelled and not folder.exists()
    with pytest.raises(RuntimeError, match="cancelled"):
        job.finish()
    assert not folder.exists()
    with pytest.raises(Exception, match="field strength"):  # checked before any process starts
        logic.process(magnitude, phase, gre.echo_times, 0.0, wait=False)
    failing = logic.process(magnitude, phase, gre.echo_times, 3.0, QSMOptions(mask_erosion_mm=500.0), wait=False)
    assert failing.task.wait(300) != 0
    with pytest.raises(
        RuntimeError, match="alsquant qsm failed:(.|\n)*mask"
    ):  # the command's own error reaches the user
        failing.finish()
    assert failing.temporary is None


def test_atlas_logic_labels_measures_and_gives_the_transform(module_logic, mrml_scene, subject, tmp_path):
    import vtk

    from ALSQuantCommonLib import nodes
    from AtlasLabelingLib.logic import AtlasLabelingLogic

    config = phantom.PhantomConfig()
    phantom.write_template(tmp_path, config)
    atlas_dir = str(tmp_path / phantom.TRUTH_DIR / "template")
    fa = nodes.volumeFromImage(
        mrml_scene, subject.truth_dwi["fa"].astype(np.float32), subject.dwi.affine, "FA"
    )  # as written to NIfTI
    mk = nodes.volumeFromImage(mrml_scene, subject.truth_dwi["mk"], subject.dwi.affine, "MK")
    gre = nodes.volumeFromImage(mrml_scene, subject.gre.magnitude[..., 0], subject.gre.affine, "GRE")
    ms = nodes.volumeFromImage(mrml_scene, subject.truth_gre["chi"], subject.gre.affine, "chi")
    logic = AtlasLabelingLogic(mrml_scene)
    options = LabelingOptions(atlas="phantom", atlas_dir=atlas_dir)
    out = logic.process(fa, options, mapNodes={"mk": mk, "fa": fa, "ms": ms}, greMagnitudeNode=gre)
    assert out["labels"].GetClassName() == out["greLabels"].GetClassName() == "vtkMRMLLabelMapVolumeNode"
    np.testing.assert_array_equal(_ijk_to_ras(out["labels"]), _ijk_to_ras(fa))
    np.testing.assert_array_equal(_ijk_to_ras(out["greLabels"]), _ijk_to_ras(gre))
    colors = out["colorTable"]
    assert out["labels"].GetDisplayNode().GetColorNodeID() == colors.GetID()
    assert colors.GetColorName(phantom.CST_LEFT).lower().startswith("cst")
    labels, _ = nodes.imageFromVolume(out["labels"])
    true_cst = np.isin(subject.truth_dwi["label"], phantom.REGIONS["CST"])
    cst = np.isin(labels, phantom.REGIONS["CST"])
    assert 2 * (cst & true_cst).sum() / (cst.sum() + true_cst.sum()) > 0.7
    rows = nodes.rowsFromTable(out["table"])
    cst_mk = [float(r["mean"]) for r in rows if r["region"] == "CST" and r["map"] == "mk"]
    assert len(cst_mk) == 2 and np.mean(cst_mk) == pytest.approx(subject.values["cst_mk"], rel=0.03)
    # M1 on the GRE grid: the true susceptibility, measured in the grey matter's core of the label (3 mm margin)
    m1_ms = {r["side"]: r for r in rows if r["region"] == "M1" and r["map"] == "ms" and r["space"] == "gre"}
    gre_labels = nodes.imageFromVolume(out["greLabels"])[0]
    for side, value in zip(("left", "right"), phantom.REGIONS["M1"]):
        assert 50 < float(m1_ms[side]["n"]) < np.sum(gre_labels == value)
        assert float(m1_ms[side]["mean"]) == pytest.approx(subject.values["m1_chi"], rel=0.02)
    # The affine part of the registration, as Slicer's "from parent" transform: template points land near the
    # subject's anatomy (the SyN warp is not in it).
    template_labels, template_affine = phantom.make_template(config)["label"], phantom.make_template(config)["affine"]
    from ALSQuantLib import geometry

    centre_template = geometry.voxel_centers_world(template_labels.shape, template_affine)[
        np.isin(template_labels, phantom.REGIONS["CST"])
    ].mean(axis=0)
    centre_subject = geometry.voxel_centers_world(true_cst.shape, subject.dwi.affine)[true_cst].mean(axis=0)
    matrix = vtk.vtkMatrix4x4()
    out["transform"].GetMatrixTransformFromParent(matrix)
    moved = np.array(matrix.MultiplyPoint([*centre_template, 1.0])[:3])
    assert np.linalg.norm(moved - centre_subject) < 4.0, (moved, centre_subject)
    assert np.linalg.norm(centre_template - centre_subject) > np.linalg.norm(moved - centre_subject)
    # The panel's way gives the same labels; without the cortex segmentation, M1 on the GRE grid is the propagated
    # label whole, of which the default kept the grey-matter part.
    job = logic.process(
        fa, replace(options, cortex_segmentation=False), mapNodes={"mk": mk}, greMagnitudeNode=gre, wait=False
    )
    assert job.task.wait(600) == 0, job.task.errorText()
    background = job.finish()
    np.testing.assert_array_equal(nodes.imageFromVolume(background["labels"])[0], labels)
    m1_in_grey = np.isin(nodes.imageFromVolume(out["greLabels"])[0], phantom.REGIONS["M1"])
    m1_whole = np.isin(nodes.imageFromVolume(background["greLabels"])[0], phantom.REGIONS["M1"])
    assert m1_in_grey.sum() > 100 and not (m1_in_grey & ~m1_whole).any() and m1_whole.sum() > 1.1 * m1_in_grey.sum()


def test_classification_logic_curves_model_and_diagnosis(module_logic, mrml_scene, tmp_path):
    from ALSClassificationLib.logic import ALSClassificationLogic
    from ALSQuantCommonLib import nodes

    rng = np.random.default_rng(4)
    rows = []
    for n, group in enumerate(["ALS"] * 25 + ["control"] * 20):
        values = phantom.draw_subject_values(group, rng)
        rows.append(
            {"participant_id": f"sub-{n:02d}", "group": group, "cst_mk": values["cst_mk"], "m1_ms": values["m1_chi"]}
        )
    cohort = nodes.tableFromRows(mrml_scene, rows, "cohort")
    logic = ALSClassificationLogic(mrml_scene)
    out = logic.analyze(cohort, ["cst_mk", "m1_ms"], combinations=["cst_mk+m1_ms"])
    chart = out["chart"]
    assert chart.GetNumberOfPlotSeriesNodes() == 3
    for name, curve in out["curves"].items():
        points = nodes.rowsFromTable(curve)
        fpr, tpr = np.array([float(p["fpr"]) for p in points]), np.array([float(p["tpr"]) for p in points])
        assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
        reported = out["results"]["markers"].get(name) or out["results"]["combinations"][name]
        auc = reported.get("auc", reported.get("auc_apparent"))
        assert np.trapezoid(tpr, fpr) == pytest.approx(auc, abs=1e-9)  # the plotted curve's area is the reported AUC
    assert out["results"]["markers"]["cst_mk"]["direction"] == ">"  # lower MK in ALS
    model_path = tmp_path / "model.json"
    logic.saveModel(cohort, ["cst_mk", "m1_ms"], model_path)
    assert stats.load_model(model_path)["markers"] == ["cst_mk", "m1_ms"]
    als_like = nodes.tableFromRows(mrml_scene, [{"cst_mk": 0.98, "m1_ms": 0.33}], "subject")
    result = logic.classify(model_path, als_like)
    assert result["decision"] == "ALS" and result["probability"] > 0.9
    assert nodes.rowsFromTable(result["table"])[0]["marker"] == "cst_mk"
    assert logic.classify(model_path, {"cst_mk": 1.11, "m1_ms": 0.08})["decision"] == "control"
    # Atlas Labeling's ROI statistics table straight in: each marker is the voxel-weighted mean of left and right
    # (CST MK (0.97 x 300 + 1.00 x 100) / 400 = 0.9775; M1 MS (0.30 x 50 + 0.36 x 150) / 200 = 0.345)
    roi_rows = [
        {"region": "CST", "side": "left", "map": "mk", "space": "reference", "n": 300, "mean": 0.97},
        {"region": "CST", "side": "right", "map": "mk", "space": "reference", "n": 100, "mean": 1.00},
        {"region": "M1", "side": "left", "map": "ms", "space": "gre", "n": 50, "mean": 0.30},
        {"region": "M1", "side": "right", "map": "ms", "space": "gre", "n": 150, "mean": 0.36},
        {"region": "M1", "side": "left", "map": "ms", "space": "reference", "n": 9, "mean": 5.0},  # not this grid's
    ]
    from_labels = logic.classify(model_path, nodes.tableFromRows(mrml_scene, roi_rows, "roi_statistics"))
    by_hand = logic.classify(model_path, {"cst_mk": 0.9775, "m1_ms": 0.345})
    assert from_labels["probability"] == pytest.approx(by_hand["probability"], rel=1e-12)
    # Adjusted for age: the same figures as the library's, and a model that needs the subject's age
    for n, row in enumerate(rows):
        row["age"] = 45 + (n * 7) % 30
    aged = nodes.tableFromRows(mrml_scene, rows, "cohort_aged")
    adjusted = logic.analyze(aged, ["cst_mk", "m1_ms"], covariates=["age"])["results"]["adjusted"]
    library = stats.analyze(stats.read_cohort(rows, markers=["cst_mk", "m1_ms"], covariates=["age"]))[0]["adjusted"]
    assert adjusted["markers"]["cst_mk"]["auc"] == library["markers"]["cst_mk"]["auc"]
    logic.saveModel(aged, ["cst_mk", "m1_ms"], tmp_path / "aged.json", covariates=["age"])
    with pytest.raises(InputError, match="no value for covariate"):
        logic.classify(tmp_path / "aged.json", {"cst_mk": 1.0, "m1_ms": 0.2})
    assert logic.classify(tmp_path / "aged.json", {"cst_mk": 1.0, "m1_ms": 0.2, "age": 60})["decision"] in (
        "ALS",
        "control",
    )


def test_sample_subject_is_built_offline_into_nodes(module_logic, mrml_scene):
    from ALSQuantCommonLib import nodes, sample

    loaded = sample.loadSampleSubject(mrml_scene, group="control", seed=3)
    assert loaded.dwi.GetNumberOfGradients() == len(loaded.truth.dwi.bvals)
    assert len(loaded.magnitude) == len(loaded.echoTimes) == len(phantom.PhantomConfig().echo_times)
    np.testing.assert_array_equal(nodes.imageFromVolume(loaded.truthLabels)[0], loaded.truth.truth_dwi["label"])
    assert loaded.values["cst_mk"] > 0


def test_dependencies_pin_slicers_own_packages(module_logic, tmp_path, monkeypatch):
    import types

    from ALSQuantCommonLib import dependencies

    assert dependencies.missingRequirements() == []  # this environment has everything
    pins = dict(p.split("==") for p in dependencies.constraints())
    assert pins["numpy"] == metadata.version("numpy") and pins["scipy"] == metadata.version("scipy")
    assert pins["SimpleITK"] == metadata.version("SimpleITK")
    # A missing package: installed through Slicer's pip_install with the pins as constraints, after asking.
    monkeypatch.setitem(dependencies.REQUIREMENTS, "alsquant_absent_module", "alsquant-absent-package>=1")
    calls = []
    stand_in = types.SimpleNamespace(util=types.SimpleNamespace(pip_install=calls.append))
    assert dependencies.ensureDependencies(stand_in, confirm=lambda text: "alsquant-absent-package" in text) == [
        "alsquant-absent-package>=1"
    ]
    (arguments,) = calls
    assert arguments[0] == "-c" and arguments[2:] == ["alsquant-absent-package>=1"]
    assert f"scipy=={metadata.version('scipy')}" in open(arguments[1]).read()
    with pytest.raises(RuntimeError, match="cannot run"):
        dependencies.ensureDependencies(stand_in, confirm=lambda text: False)


# ----------------------------------------------------------------------------------------------------------------
# Static checks of the module files
# ----------------------------------------------------------------------------------------------------------------
OPTIONS_CLASSES = {"DKIOptions": DKIOptions, "QSMOptions": QSMOptions, "LabelingOptions": LabelingOptions}


def _parameter_fields(module):
    """The parameter node's fields: those declared in the class, and those `withOptions(X)` adds from X."""
    return set(_parameter_kinds(module))


@pytest.mark.parametrize("module", PANELS)
def test_ui_parses_and_binds_only_parameter_node_fields(module):
    root = ET.parse(MODULES_DIR / module / "Resources" / "UI" / f"{module}.ui").getroot()
    assert root.find("widget").get("class") == "qMRMLWidget"
    bound = {p.find("string").text for p in root.iter("property") if p.get("name") == "SlicerParameterName"}
    fields = _parameter_fields(module)
    assert bound <= fields, bound - fields
    assert fields <= bound, fields - bound  # every parameter has its widget
    names = {w.get("name") for w in root.iter("widget")}
    assert {"applyButton", "cancelButton", "progressBar", "logText"} <= names
    combos = {w.get("name") for w in root.iter("widget") if w.get("class") == "qMRMLNodeComboBox"}
    connected = {
        c.find("receiver").text for c in root.iter("connection") if c.find("slot").text == "setMRMLScene(vtkMRMLScene*)"
    }
    assert combos == connected  # each node selector sees the scene


# The widgets Slicer's parameterNodeWrapper can bind each type to (its guiConnectors: exact classes).
CONNECTABLE = {
    "node": {"qMRMLNodeComboBox"},
    "bool": {"QCheckBox", "QPushButton"},
    "int": {"QSpinBox", "QSlider"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget"},
    "str": {"QLineEdit", "QTextEdit"},
    "choice": {"QComboBox"},
    "Path": {"ctkPathLineEdit", "ctkDirectoryButton"},
}


def _wrapper_class(module):
    tree = ast.parse((MODULES_DIR / module / f"{module}.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and "parameterNodeWrapper" in [
            getattr(d, "id", None) for d in node.decorator_list
        ]:
            return node
    raise AssertionError(f"{module}: no @parameterNodeWrapper class")


def _parameter_kinds(module):
    """Parameter name → the kind of value it holds (the keys of CONNECTABLE): the fields declared in the class and
    those `withOptions(X)` adds from X."""
    from ALSQuantLib import options

    wrapper, kinds = _wrapper_class(module), {}
    for item in wrapper.body:
        if isinstance(item, ast.AnnAssign):
            name = ast.unparse(item.annotation)
            kinds[item.target.id] = "node" if name.startswith("vtkMRML") else name.split(".")[-1]
    for decorator in wrapper.decorator_list:
        if isinstance(decorator, ast.Call) and getattr(decorator.func, "id", None) == "withOptions":
            for name, spec in options.parameter_fields(OPTIONS_CLASSES[decorator.args[0].id]).items():
                kinds[name] = "choice" if spec.choices else spec.type.__name__
    return kinds


@pytest.mark.parametrize("module", PANELS)
def test_each_parameter_is_bound_to_a_widget_slicer_can_connect(module):
    root = ET.parse(MODULES_DIR / module / "Resources" / "UI" / f"{module}.ui").getroot()
    widgets = {}
    for widget in root.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                widgets[prop.find("string").text] = widget
    for name, kind in _parameter_kinds(module).items():
        assert widgets[name].get("class") in CONNECTABLE[kind], (name, kind, widgets[name].get("class"))
        if kind == "choice":  # the choices come from the options' declaration, not from the .ui
            assert not widgets[name].findall("item"), name


@pytest.mark.parametrize("module", MODULE_NAMES)
def test_cmake_lists_name_every_module_file(module):
    folder = MODULES_DIR / module
    text = (folder / "CMakeLists.txt").read_text().replace("${MODULE_NAME}", module)
    named = set(re.findall(r"^\s+([\w./-]+\.(?:py|ui|png|txt))\s*$", text, flags=re.M))
    for path in named:
        assert (folder / path).is_file(), path
    python_files = {str(p.relative_to(folder)) for p in folder.rglob("*.py")}
    assert python_files <= named, python_files - named
    resources = (
        {str(p.relative_to(folder)) for p in (folder / "Resources").rglob("*") if p.is_file()}
        if (folder / "Resources").exists()
        else set()
    )
    assert resources <= named, resources - named


def test_top_level_cmake_adds_every_module_and_the_library():
    text = (PROJECT_ROOT / "CMakeLists.txt").read_text()
    assert set(re.findall(r"add_subdirectory\(ALSQuant/(\w+)\)", text)) == set(MODULE_NAMES)
    listed = set(re.findall(r"^\s+(ALSQuantLib/[\w/]+\.py)\s*$", text, flags=re.M))
    library = PROJECT_ROOT / "ALSQuantLib"
    assert listed == {f"ALSQuantLib/{p.relative_to(library)}" for p in library.rglob("*.py")}
    resources = set(re.findall(r"^\s+(ALSQuantLib/[\w/]+\.json)\s*$", text, flags=re.M))
    assert resources == {f"ALSQuantLib/{p.relative_to(library)}" for p in library.rglob("*.json")} and resources


@pytest.mark.parametrize("module", MODULE_NAMES)
def test_module_files_follow_the_scripted_module_shape(module):
    source = (MODULES_DIR / module / f"{module}.py").read_text()
    tree = ast.parse(source)
    classes = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    assert {module, f"{module}Test"} <= classes
    if module != "ALSQuantCommon":
        assert {f"{module}Widget", f"{module}ParameterNode"} <= classes
        widget = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == f"{module}Widget")
        assert [b.id for b in widget.bases] == ["PanelWidget"]  # the shared widget binds the .ui with connectGui
        assert f'moduleName = "{module}"' in source and "tryWithErrorDisplay" in source and '"ALSQuant"' in source
    else:
        assert "self.parent.hidden = True" in source and "connectGui(self.ui)" in source
    # Dependencies are installed on first use: nothing at the top of a module file imports a package Slicer lacks
    # (the options it imports from ALSQuantLib need only numpy and scipy: test_module_imports_are_light).
    top_imports = {
        alias.name.split(".")[0]
        for node in tree.body
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])
    }
    assert not top_imports & HEAVY, top_imports
    assert "_(" in source and "helpText(" in source  # translated strings; help text linking to the README


HEAVY = {"nibabel", "dipy", "ants", "sklearn", "skimage", "matplotlib", "nrrd", "SimpleITK"}


def test_module_imports_are_light(module_logic):
    """What a module file and its logic import when Slicer loads them needs nothing beyond numpy and scipy (which
    Slicer has): the other packages are installed on first use."""
    code = (
        "import sys\n"
        f"sys.path[:0] = {[str(MODULES_DIR / m) for m in MODULE_NAMES]!r}\n"
        "import ALSQuantLib.dki, ALSQuantLib.qsm, ALSQuantLib.atlas, ALSQuantLib.options\n"
        "import ALSQuantCommonLib.parameters, ALSQuantCommonLib.logic\n"
        f"for module in {[f'{m}Lib.logic' for m in PANELS]!r}: __import__(module)\n"
        f"print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(HEAVY)!r})))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_each_module_logic_owns_its_parameter_node(module_logic, mrml_scene):
    """Each logic's parameter node is the scene's singleton tagged with its own module name, so two panels never
    share one (Slicer's ScriptedLoadableModuleLogic derives the name from the class, less "Logic")."""
    from ALSClassificationLib.logic import ALSClassificationLogic
    from AtlasLabelingLib.logic import AtlasLabelingLogic
    from DKIReconstructionLib.logic import DKIReconstructionLogic
    from QSMReconstructionLib.logic import QSMReconstructionLogic

    logics = [DKIReconstructionLogic(), QSMReconstructionLogic(), AtlasLabelingLogic(), ALSClassificationLogic()]
    found = [logic.getParameterNode() for logic in logics]
    assert all(node.IsA("vtkMRMLScriptedModuleNode") for node in found)
    assert [node.GetAttribute("ModuleName") for node in found] == list(PANELS)
    assert (
        len({node.GetID() for node in found}) == 4
        and mrml_scene.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode") == 4
    )
    found[0].SetParameter("maskVolume", "dki-mask")
    assert found[1].GetParameter("maskVolume") == ""  # the QSM panel's mask is its own
    again = DKIReconstructionLogic().getParameterNode()  # a new logic finds the module's node
    assert again.GetID() == found[0].GetID() and again.GetParameter("maskVolume") == "dki-mask"


@pytest.mark.parametrize("optionsClass", OPTIONS_CLASSES.values())
def test_parameter_node_fields_come_from_the_options_and_go_back(module_logic, optionsClass):
    from ALSQuantCommonLib.parameters import optionsFrom, withOptions

    @withOptions(optionsClass)
    class Panel:
        inputVolume: object

    assert set(Panel.__annotations__) == {"inputVolume", *options_fields(optionsClass)}
    panel = Panel()
    assert optionsFrom(panel) == optionsClass()  # the defaults are the options' defaults
    changed = {f.name: _another_value(optionsClass, f) for f in dataclasses.fields(optionsClass)}
    for name, spec in options_fields(optionsClass).items():
        value = changed[spec.option]
        setattr(panel, name, ",".join(value) if isinstance(value, tuple) else value)
    assert optionsFrom(panel) == optionsClass(**changed)
    with pytest.raises(TypeError, match="declared by hand"):
        withOptions(optionsClass)(
            type("Clash", (), {"__annotations__": {next(iter(options_fields(optionsClass))): str}})
        )


def options_fields(optionsClass):
    from ALSQuantLib import options

    return options.parameter_fields(optionsClass)


def _another_value(optionsClass, field):
    """A valid value other than the default."""
    if field.metadata["choices"]:
        return next(c for c in field.metadata["choices"] if c != field.default)
    if field.metadata["path"]:
        return "/data/atlas-file"
    if isinstance(field.default, bool):
        return not field.default
    if isinstance(field.default, tuple):
        return ("CST",)
    return type(field.default)(field.default + 1)


def test_requirements_file_matches_pyproject(module_logic):
    tomllib = pytest.importorskip("tomllib")
    from ALSQuantCommonLib import dependencies

    declared = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert sorted(dependencies.readRequirements().values()) == sorted(declared)
    assert dependencies.REQUIREMENTS["ants"] == "antspyx>=0.5" and dependencies.REQUIREMENTS["sklearn"].startswith(
        "scikit-learn"
    )
