"""ALSQuantLib.pipeline and the run-subject / run-cohort commands, on simulated subjects with known truth."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import child_processes

from ALSQuantLib import __version__, cli, derivatives, io, phantom, pipeline, provenance, registration, workflows
from ALSQuantLib.atlas import LabelingOptions
from ALSQuantLib.dki import DKIOptions
from ALSQuantLib.errors import InputError
from ALSQuantLib.qsm import QSMOptions


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Four phantom subjects (2 ALS, 2 control) with their truth."""
    folder = tmp_path_factory.mktemp("cohort") / "ds"
    rows = phantom.simulate_cohort(folder, 4, seed=11)
    return folder, {row["participant_id"]: row for row in rows}


def _options(folder, gre_brain="magnitude", motion_correction=False, **qsm_changes):
    """The phantom atlas; the QSM in the magnitude's brain mask unless `gre_brain` says otherwise: the phantom has no
    head, and this spares a registration a subject (the brain stage is tested in the first test). The phantom's
    subjects hold still: the motion correction (on by default) is left out unless asked for, which spares 42
    registrations a subject (the default path runs in the first test and the demo's)."""
    labeling = LabelingOptions(atlas="phantom", atlas_dir=str(folder / phantom.TRUTH_DIR / "template"))
    return pipeline.SubjectOptions(
        dki=DKIOptions(motion_correction=motion_correction),
        qsm=QSMOptions(**qsm_changes),
        labeling=labeling,
        gre_brain=gre_brain,
    )


def _checksums(folder):
    return {p: provenance.file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_run_subject_measures_the_markers_and_reruns_only_what_changed(cohort, tmp_path, capsys):
    folder, truth = cohort
    inputs = pipeline.find_subject(folder, "sub-01")
    before = _checksums(folder / "sub-01")
    out = tmp_path / "sub-01"
    args = [
        "run-subject",
        "--dwi",
        str(inputs.dwi),
        "--gre-magnitude",
        *map(str, inputs.gre_magnitude),
        "--gre-phase",
        *map(str, inputs.gre_phase),
        "--atlas",
        "phantom",
        "--atlas-dir",
        str(folder / phantom.TRUTH_DIR / "template"),
        "--subject",
        "sub-01",
        "--out",
        str(out),
    ]
    assert cli.main(args) == 0
    assert "stages run: dki, brain, qsm, label" in capsys.readouterr().out
    markers = io.read_json(out / "markers.json")
    true = truth["sub-01"]
    assert markers["cst_mk"] == pytest.approx(float(true["cst_mk"]), rel=0.03)  # the atlas issue measured -1.8 % bias
    assert markers["cst_md"] == pytest.approx(float(true["cst_md"]), rel=0.03)
    assert 0 < markers["m1_ms"] < float(true["m1_chi"])  # positive, and underestimated (test_qsm measures the slope)
    assert markers["qc_passed"]
    for stage, names in (
        ("dki", ["mk", "fa", "md", "mask"]),
        ("qsm", ["susceptibility", "local_field", "mask"]),
        ("label", ["labels_reference", "labels_gre"]),
    ):
        for name in names:
            assert (out / stage / f"{name}.nii.gz").exists()
    # The QSM's mask is the atlas template's brain brought onto the GRE (the phantom has no head, so the magnitude's
    # threshold would do as well): it holds the true brain's tissue and little else. The phantom's FA template is 0 in
    # CSF, so the 3 mm of CSF around its brain are left out (measured: 0.89 of the brain with that CSF).
    brain = io.load_image(out / "brain" / "brain_gre.nii.gz")[0] > 0
    true_labels = io.load_image(folder / phantom.TRUTH_DIR / "sub-01" / "sub-01_space-gre_label.nii.gz")[0]
    tissue = (true_labels > 0) & (true_labels != phantom.CSF)
    covered, outside = (brain & tissue).sum() / tissue.sum(), (brain & (true_labels == 0)).sum() / brain.sum()
    print(f"template brain on the GRE: {covered:.3f} of the true brain's tissue, {outside:.3f} of it outside the brain")
    assert covered > 0.97 and outside < 0.05
    qsm_record = io.read_json(out / "qsm" / "provenance.json")
    assert qsm_record["inputs"]["mask"]["sha256"] == provenance.file_sha256(out / "brain" / "brain_gre.nii.gz")
    _, chi_affine = io.load_image(out / "qsm" / "susceptibility.nii.gz")
    _, gre_affine = io.load_image(inputs.gre_magnitude[0])
    np.testing.assert_allclose(chi_affine, gre_affine, atol=1e-5)
    # One page to check the subject by eye: the verdict, the markers by name, the labels over FA and the GRE, over
    # each measured map, and the head motion (corrected by default)
    page = (out / pipeline.SUBJECT_PAGE).read_text()
    assert "quality check: passed" in page and "CST mean kurtosis" in page and "M1 magnetic susceptibility" in page
    assert page.count("data:image/png;base64,") == 3 and (out / "label" / workflows.MAPS_PICTURE).is_file()
    # The results under BIDS-derivative names: the stages' own files (hard links), with sidecars and label tables
    description = io.read_json(out / derivatives.DESCRIPTION)
    assert description["DatasetType"] == "derivative" and description["GeneratedBy"][0]["Version"] == __version__
    bids = {
        "dwi/sub-01_model-dki_param-mk_dwimap.nii.gz": "dki/mk.nii.gz",
        "dwi/sub-01_model-dki_param-md_dwimap.nii.gz": "dki/md.nii.gz",
        "dwi/sub-01_desc-brain_mask.nii.gz": "dki/mask.nii.gz",
        "dwi/sub-01_desc-regions_dseg.nii.gz": "label/labels_reference.nii.gz",
        "anat/sub-01_Chimap.nii.gz": "qsm/susceptibility.nii.gz",
        "anat/sub-01_desc-regions_dseg.nii.gz": "label/labels_gre.nii.gz",
    }
    for name, stage_file in bids.items():
        assert os.path.samefile(out / "sub-01" / name, out / stage_file), name
    chi_sidecar = io.read_json(out / "sub-01" / "anat" / "sub-01_Chimap.json")
    assert chi_sidecar["Units"] == "ppm" and chi_sidecar["ReferenceOption"] == "whole-brain"
    assert chi_sidecar["Sources"][0] == inputs.dwi.resolve().as_uri()
    assert io.read_json(out / "sub-01" / "dwi" / "sub-01_model-dki_param-md_dwimap.json")["Units"] == "mm^2/s"
    dseg = io.read_table(out / "sub-01" / "anat" / "sub-01_desc-regions_dseg.tsv")
    present = set(np.unique(io.load_image(out / "label" / "labels_gre.nii.gz")[0])) - {0}
    assert present <= {int(row["index"]) for row in dseg} and any("M1" in row["name"] for row in dseg)
    # a participant name that is no BIDS label, in a session
    placed = derivatives.export_subject(out, tmp_path / "bids", "patient_7", "2", [inputs.dwi])
    assert tmp_path / "bids/sub-patient7/ses-2/dwi/sub-patient7_ses-2_model-dki_param-fa_dwimap.nii.gz" in placed
    assert not list(out.rglob("*.tmp*"))  # every atomic write finished
    assert not list(out.rglob(f"{registration.WORKDIR_PREFIX}*"))  # no ANTs work folder left
    assert _checksums(folder / "sub-01") == before  # inputs untouched
    # One registration a subject: the labelling used the brain stage's (recorded among its inputs), and labels
    # exactly as it does when it registers again itself (ANTs single-threaded repeats bit for bit).
    kept = io.read_json(out / "brain" / workflows.REGISTRATION_RECORD)
    label_record = io.read_json(out / "label" / "provenance.json")
    assert "registrations" in label_record["inputs"]
    assert io.read_json(out / "label" / "quality.json")["template_correlation"] == kept["template"]["similarity"]
    again = workflows.label_step(
        out / "dki" / "fa.nii.gz",
        tmp_path / "registered-again",
        _options(folder).labeling,
        gre_magnitude=inputs.gre_magnitude[0],
    )
    for space in ("reference", "gre"):
        reused = io.load_image(out / "label" / f"labels_{space}.nii.gz")[0]
        np.testing.assert_array_equal(io.load_image(again.folder / f"labels_{space}.nii.gz")[0], reused)

    assert cli.main(args) == 0
    assert "stages run: none" in capsys.readouterr().out
    # Another inversion changes the susceptibility, hence the labelling stage's input: DKI stays.
    defaults = _options(folder, "template", motion_correction=True, inversion="tkd")
    result = pipeline.run_subject(inputs, out, defaults)
    assert result["stages_run"] == ["qsm", "label"]
    assert result["cst_mk"] == markers["cst_mk"]
    assert os.path.samefile(out / "sub-01" / "anat" / "sub-01_Chimap.nii.gz", out / "qsm" / "susceptibility.nii.gz")
    # A stage whose output vanished runs again.
    (out / "dki" / "md.nii.gz").unlink()
    assert pipeline.run_subject(inputs, out, defaults)["stages_run"] == ["dki"]


def test_run_cohort_resumes_after_a_kill_and_reports_a_failing_subject(cohort, tmp_path, capsys):
    folder, truth = cohort
    broken = tmp_path / "ds"
    broken.mkdir()
    for item in folder.iterdir():  # the same dataset, with sub-03's b-values truncated
        (broken / item.name).symlink_to(item)
    (broken / "sub-03").unlink()
    for source in (folder / "sub-03").rglob("*"):
        if source.is_file():
            target = broken / "sub-03" / source.relative_to(folder / "sub-03")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
    bval = broken / "sub-03" / "dwi" / "sub-03_dwi.bval"
    bval.write_text(" ".join(bval.read_text().split()[:5]) + "\n")

    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "ALSQuantLib.cli",
        "run-cohort",
        str(broken),
        "--out",
        str(out),
        "--workers",
        "2",
        "--atlas",
        "phantom",
        "--atlas-dir",
        str(folder / phantom.TRUTH_DIR / "template"),
        "--gre-brain",
        "magnitude",
        "--no-motion-correction",  # the phantom's subjects hold still (see _options)
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not list(out.glob("subjects/*/markers.json")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)  # the run, its workers and all
    process.wait()
    finished = {p.parent.name for p in out.glob("subjects/*/markers.json")}
    assert finished and not (out / pipeline.COHORT_TABLE).exists()

    assert cli.main(command[3:]) == 1  # resumed; one subject failed
    printed = capsys.readouterr().out
    failures = io.read_json(out / pipeline.FAILURES)
    assert list(failures) == ["sub-03"] and "sub-03_dwi.bval" in failures["sub-03"]
    assert "sub-03 FAILED" in printed
    rows = io.read_table(out / pipeline.COHORT_TABLE)
    assert [r["participant_id"] for r in rows] == ["sub-01", "sub-02", "sub-04"]
    for subject in finished:  # nothing done before the kill was done again
        log = (out / "logs" / f"{subject}.log").read_text()
        assert log.count("current, skipped") == 3, log  # dki, qsm, label: --gre-brain magnitude runs no brain stage
        assert f"{subject} already done" in printed
    for row in rows:
        assert float(row["cst_mk"]) == pytest.approx(float(truth[row["participant_id"]]["cst_mk"]), rel=0.03)
    assert "Traceback" in (out / "logs" / "sub-03.log").read_text()
    # The cohort's page links each measured subject's page and names the failed one
    index = (out / pipeline.COHORT_PAGE).read_text()
    for row in rows:
        page = f"subjects/{row['participant_id']}/{pipeline.SUBJECT_PAGE}"
        assert f'<a href="{page}">{row["participant_id"]}</a>' in index and (out / page).is_file()
    assert "sub-03" in index.split("<h2>Failed</h2>")[1]
    # The output folder is a BIDS-derivative dataset of the source: its subjects' results under BIDS names
    description = io.read_json(out / derivatives.DESCRIPTION)
    assert description["SourceDatasets"] == [{"URL": broken.resolve().as_uri()}]
    for row in rows:
        subject = row["participant_id"]
        named = out / subject / "dwi" / f"{subject}_model-dki_param-mk_dwimap.nii.gz"
        assert os.path.samefile(named, out / "subjects" / subject / "dki" / "mk.nii.gz")
    assert "subjects/" in (out / derivatives.IGNORE).read_text().split()


def test_run_cohort_on_a_dask_cluster_gives_the_local_results(cohort, tmp_path):
    distributed = pytest.importorskip("distributed")
    folder, _ = cohort
    subjects = ["sub-02", "sub-03"]
    local = pipeline.run_cohort(
        folder, tmp_path / "local", _options(folder), workers=2, subjects=subjects, echo=lambda line: None
    )
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        remote = pipeline.run_cohort(
            folder,
            tmp_path / "dask",
            _options(folder),
            scheduler=cluster.scheduler_address,
            subjects=subjects,
            echo=lambda line: None,
        )
    assert not remote.failures and len(remote.rows) == 2
    assert remote.rows == local.rows  # single-threaded ANTs with a fixed seed: the same numbers everywhere


def test_run_cohort_refuses_bad_requests(cohort, tmp_path):
    folder, _ = cohort
    with pytest.raises(pipeline.InputError, match="sub-99"):
        pipeline.run_cohort(folder, tmp_path / "o", _options(folder), subjects=["sub-99"])
    with pytest.raises(pipeline.InputError, match="dataset itself"):
        pipeline.run_cohort(folder, folder, _options(folder))
    with pytest.raises(pipeline.InputError, match="participant_id"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "participants.tsv").write_text("name\tgroup\nx\tALS\n")
        pipeline.run_cohort(tmp_path / "empty", tmp_path / "o2", _options(folder))


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the worker processes")
def test_a_worker_that_dies_is_reported_and_the_run_goes_on(cohort, tmp_path):
    import threading

    folder, _ = cohort
    result = {}
    thread = threading.Thread(
        target=lambda: result.update(
            r=pipeline.run_cohort(folder, tmp_path / "out", _options(folder), workers=2, echo=lambda line: None)
        )
    )
    before = set(child_processes(os.getpid()))
    thread.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list((tmp_path / "out").glob("subjects/*/dki")):
        time.sleep(0.1)  # the workers are at work
    workers = [
        pid
        for pid in child_processes(os.getpid())
        if pid not in before and b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    assert workers
    os.kill(workers[0], signal.SIGKILL)
    thread.join(300)
    failures = result["r"].failures
    # Only the killed process's subject fails; the others are measured in the same run.
    assert len(failures) == 1 and "worker process died (exit code -9)" in next(iter(failures.values()))
    assert set(failures) | {r["participant_id"] for r in result["r"].rows} == {"sub-01", "sub-02", "sub-03", "sub-04"}
    assert len(result["r"].rows) == 3
    # A rerun finishes them.
    again = pipeline.run_cohort(folder, tmp_path / "out", _options(folder), workers=2, echo=lambda line: None)
    assert not again.failures and len(again.rows) == 4


def test_run_subject_refuses_inputs_inside_its_output_folders(cohort, tmp_path):
    folder, _ = cohort
    inputs = pipeline.find_subject(folder, "sub-01")
    inside = tmp_path / "out" / "qsm" / inputs.gre_phase[0].name
    inside.parent.mkdir(parents=True)
    inside.write_bytes(inputs.gre_phase[0].read_bytes())
    moved = pipeline.SubjectInputs("sub-01", inputs.dwi, inputs.gre_magnitude, (inside,), inputs.bval, inputs.bvec)
    with pytest.raises(pipeline.InputError, match="output folder"):
        pipeline.run_subject(moved, tmp_path / "out", _options(folder))


def test_masks_reach_run_subject_and_are_found_by_their_bids_names(cohort, tmp_path, capsys):
    """The brain and grey-matter masks given to run-subject are the ones the steps use (their records hash them);
    run-cohort finds them by their BIDS-derivative names; one on the wrong grid is refused before any stage."""
    folder, _ = cohort
    truth = folder / phantom.TRUTH_DIR / "sub-02"
    dwi_labels, dwi_affine = io.load_image(truth / "sub-02_space-dwi_label.nii.gz")
    gre_labels, gre_affine = io.load_image(truth / "sub-02_space-gre_label.nii.gz")
    masks = {
        "dwi": (tmp_path / "dwi_mask.nii.gz", dwi_labels > 0, dwi_affine),
        "gre": (tmp_path / "gre_mask.nii.gz", gre_labels > 0, gre_affine),
        "tissue": (tmp_path / "gm_mask.nii.gz", np.isin(gre_labels, (phantom.GM, *phantom.REGIONS["M1"])), gre_affine),
    }
    for path, data, affine in masks.values():
        io.save_image(path, data, affine, dtype=np.uint8)
    inputs = pipeline.find_subject(folder, "sub-02")
    args = ["run-subject", "--dwi", str(inputs.dwi), "--gre-magnitude", *map(str, inputs.gre_magnitude)]
    args += ["--gre-phase", *map(str, inputs.gre_phase), "--atlas", "phantom"]
    args += ["--atlas-dir", str(folder / phantom.TRUTH_DIR / "template"), "--out", str(tmp_path / "out")]
    wrong = args + ["--dwi-mask", str(masks["gre"][0])]
    assert cli.main(wrong) == 2
    assert "DWI brain mask" in capsys.readouterr().err and not (tmp_path / "out").exists()
    given = ["--dwi-mask", str(masks["dwi"][0]), "--gre-mask", str(masks["gre"][0])]
    assert cli.main(args + given + ["--tissue-mask", str(masks["tissue"][0])]) == 0
    records = {s: io.read_json(tmp_path / "out" / s / "provenance.json")["inputs"] for s in ("dki", "qsm", "label")}
    assert records["dki"]["mask"]["sha256"] == provenance.file_sha256(masks["dwi"][0])
    assert records["qsm"]["mask"]["sha256"] == provenance.file_sha256(masks["gre"][0])
    assert records["label"]["tissue_mask"]["sha256"] == provenance.file_sha256(masks["tissue"][0])
    np.testing.assert_array_equal(io.load_image(tmp_path / "out" / "dki" / "mask.nii.gz")[0] > 0, masks["dwi"][1])

    named = tmp_path / "ds"
    shutil.copytree(folder / "sub-02", named / "sub-02")
    shutil.copyfile(masks["dwi"][0], named / "sub-02" / "dwi" / "sub-02_desc-brain_mask.nii.gz")
    shutil.copyfile(masks["tissue"][0], named / "sub-02" / "anat" / "sub-02_label-GM_mask.nii.gz")
    found = pipeline.find_subject(named, "sub-02")
    assert found.dwi_mask.name == "sub-02_desc-brain_mask.nii.gz" and found.gre_mask is None
    assert found.tissue_mask.name == "sub-02_label-GM_mask.nii.gz"


def test_a_gre_exported_as_real_and_imaginary_parts_runs_through_the_pipeline(cohort, tmp_path):
    """GE and Philips export real and imaginary parts (BIDS part-real/part-imag): found, reconstructed from them,
    and the labelling gets their magnitude."""
    folder, truth = cohort
    dataset = tmp_path / "ds"
    shutil.copytree(folder / "sub-03" / "dwi", dataset / "sub-03" / "dwi")
    polar = pipeline.find_subject(folder, "sub-03")
    anat = dataset / "sub-03" / "anat"
    for magnitude_path, phase_path in zip(polar.gre_magnitude, polar.gre_phase):
        magnitude, affine = io.load_image(magnitude_path)
        phase = io.load_image(phase_path)[0]  # the simulator writes radians
        for part, data in (("real", magnitude * np.cos(phase)), ("imag", magnitude * np.sin(phase))):
            name = phase_path.name.replace("part-phase", f"part-{part}")
            io.save_image(anat / name, data, affine)
            shutil.copyfile(io.sidecar_path(phase_path), io.sidecar_path(anat / name))
    inputs = pipeline.find_subject(dataset, "sub-03")
    assert not inputs.gre_magnitude and [p.name for p in inputs.gre_real] == [
        p.name.replace("part-phase", "part-real") for p in polar.gre_phase
    ]
    out = tmp_path / "out"
    markers = pipeline.run_subject(inputs, out, _options(folder, "template"))  # the brain stage reads |real + i imag|
    true = truth["sub-03"]
    assert markers["cst_mk"] == pytest.approx(float(true["cst_mk"]), rel=0.03)
    assert 0 < markers["m1_ms"] < float(true["m1_chi"]) and markers["qc_passed"]
    record = io.read_json(out / "qsm" / "provenance.json")
    assert {"real_1", "imaginary_1", "real_1_sidecar"} <= set(record["inputs"])
    assert record["results"]["phase_scaling"].startswith("radians (as given")
    assert io.read_json(out / "qsm" / "susceptibility.json")["Units"] == "ppm"
    label_inputs = io.read_json(out / "label" / "provenance.json")["inputs"]
    assert Path(label_inputs["gre_magnitude"]["path"]) == out / "qsm" / "magnitude.nii.gz"
    np.testing.assert_allclose(
        io.load_image(out / "qsm" / "magnitude.nii.gz")[0], io.load_image(polar.gre_magnitude[0])[0], rtol=1e-4
    )


def _dcm2niix_echoes(magnitude_path, phase_path, anat, stem):
    """A 4D magnitude/phase pair written one file per echo as dcm2niix names them (``<stem>_e<N>`` and
    ``<stem>_e<N>_ph``), each with its sidecar's EchoTime."""
    sidecar = io.read_json(io.sidecar_path(phase_path))
    for source, suffix in ((magnitude_path, ""), (phase_path, "_ph")):
        data, affine = io.load_image(source)
        volumes = data[..., None] if data.ndim == 3 else data
        for echo, te in enumerate(np.atleast_1d(sidecar["EchoTime"]), 1):
            path = anat / f"{stem}_e{echo}{suffix}.nii.gz"
            io.save_image(path, volumes[..., echo - 1], affine)
            io.write_json(io.sidecar_path(path), {**sidecar, "EchoTime": float(te)})


def test_sessions_runs_and_dcm2niix_names_are_found_or_asked_for(cohort, tmp_path, capsys):
    """A longitudinal dataset: sub-01 with two sessions, the second holding two DWI runs and a GRE named as
    dcm2niix names it (one file per echo, ``_ph`` for phase). Each choice is asked for by name when ambiguous, and
    the chosen files are the ones found; run-cohort passes the choice on."""
    folder, _ = cohort
    source = pipeline.find_subject(folder, "sub-01")
    dataset = tmp_path / "ds"
    dataset.mkdir()
    shutil.copyfile(folder / "participants.tsv", dataset / "participants.tsv")
    for session in ("ses-01", "ses-02"):
        shutil.copytree(folder / "sub-01" / "anat", dataset / "sub-01" / session / "anat")
        shutil.copytree(folder / "sub-01" / "dwi", dataset / "sub-01" / session / "dwi")
    second = dataset / "sub-01" / "ses-02"
    for path in sorted((second / "anat").iterdir()):
        path.unlink()
    _dcm2niix_echoes(source.gre_magnitude[0], source.gre_phase[0], second / "anat", "sub-01_ses-02_T2starw")
    for path in sorted((second / "dwi").iterdir()):
        for run in (1, 2):
            shutil.copyfile(path, second / "dwi" / path.name.replace("sub-01_", f"sub-01_ses-02_run-{run}_"))
        path.unlink()

    with pytest.raises(InputError, match="sessions ses-01, ses-02; choose one with --session"):
        pipeline.find_subject(dataset, "sub-01")
    first = pipeline.find_subject(dataset, "sub-01", pipeline.Selection(session="01"))
    assert first.dwi == dataset / "sub-01" / "ses-01" / "dwi" / "sub-01_dwi.nii.gz"
    with pytest.raises(InputError, match="several runs .*; choose one with --dwi-run"):
        pipeline.find_subject(dataset, "sub-01", pipeline.Selection(session="ses-02"))
    chosen = pipeline.find_subject(dataset, "sub-01", pipeline.Selection("ses-02", dwi_run="2"))
    assert chosen.dwi.name == "sub-01_ses-02_run-2_dwi.nii.gz" and chosen.bval.name == "sub-01_ses-02_run-2_dwi.bval"
    echoes = len(phantom.PhantomConfig().echo_times)
    assert [p.name for p in chosen.gre_phase] == [f"sub-01_ses-02_T2starw_e{k}_ph.nii.gz" for k in range(1, echoes + 1)]
    assert [p.name for p in chosen.gre_magnitude] == [
        f"sub-01_ses-02_T2starw_e{k}.nii.gz" for k in range(1, echoes + 1)
    ]
    # read in echo order with their sidecars' echo times: the very GRE of the 4D original
    split = io.read_gre(chosen.gre_magnitude, chosen.gre_phase)
    original = io.read_gre(source.gre_magnitude, source.gre_phase)
    np.testing.assert_array_equal(split.phase, original.phase)
    np.testing.assert_array_equal(split.magnitude, original.magnitude)
    np.testing.assert_allclose(split.echo_times, original.echo_times)

    # run-cohort: the choice reaches every subject (an absent session fails each subject by name, fast)
    out = tmp_path / "out"
    atlas = ["--atlas", "phantom", "--atlas-dir", str(folder / phantom.TRUTH_DIR / "template")]
    code = cli.main(
        ["run-cohort", str(dataset), "--subjects", "sub-01", "--session", "ses-09", *atlas, "--out", str(out)]
    )
    assert code == 1 and "no session ses-09; it has ses-01, ses-02" in io.read_json(out / "failures.json")["sub-01"]
