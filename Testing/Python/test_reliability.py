"""Reliability as a hostile user meets it: two runs at once, damaged and changed files, kills and signals, a full
or read-only disk, degenerate and damaged inputs, tampered models, unsafe downloads. Real processes, real signals,
real file systems (a tmpfs mounted in a private mount namespace where the machine allows it)."""

import gzip
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import child_processes

from ALSQuantLib import atlas, cli, io, outputs, phantom, pipeline, provenance, registration, stats, workflows
from ALSQuantLib.atlas import LabelingOptions
from ALSQuantLib.errors import InputError, OutputError

SMALL = phantom.PhantomConfig()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Two phantom subjects (BIDS-like), and the arguments that point the labelling at the phantom's atlas."""
    folder = tmp_path_factory.mktemp("reliability") / "ds"
    phantom.simulate_cohort(folder, 2, seed=5, config=SMALL)
    atlas_args = ["--atlas", "phantom", "--atlas-dir", str(folder / phantom.TRUTH_DIR / "template")]
    return folder, atlas_args


def _command(*args):
    return [sys.executable, "-m", "ALSQuantLib.cli", *map(str, args)]


def _labeling(folder):
    return LabelingOptions(atlas="phantom", atlas_dir=str(folder / phantom.TRUTH_DIR / "template"))


def _copy_dwi(source, target):
    """A DWI and its bval/bvec under a new name (the step's inputs, to damage without touching the dataset)."""
    dwi = io.read_dwi(source)
    io.write_dwi(dwi, target)
    return dwi


def _assert_clear_error(code, err, *expected):
    assert code == 2, err
    assert "Traceback" not in err and "error:" in err
    for text in expected:
        assert text in err, err


# ----------------------------------------------------------------------------------------------------------------
# 1. One run per folder; a record names the bytes that were read
# ----------------------------------------------------------------------------------------------------------------
def test_a_second_run_on_a_locked_folder_is_refused_until_the_holder_dies(dataset, tmp_path, capsys):
    folder, atlas_args = dataset
    inputs = pipeline.find_subject(folder, "sub-01")
    out = tmp_path / "sub-01"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom ALSQuantLib import outputs\nwith outputs.locked(sys.argv[1]):\n"
            "    print('locked', flush=True)\n    time.sleep(600)\n",
            str(out / "dki"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        # Another process (the command line) and this one (the library) are both refused, before computing.
        done = subprocess.run(_command("dki", inputs.dwi, "--out", out / "dki"), capture_output=True, text=True)
        _assert_clear_error(done.returncode, done.stderr, "is in use by another ALSQuant run", f"process {holder.pid}")
        with pytest.raises(OutputError, match="in use by another ALSQuant run"):
            pipeline.run_subject(inputs, out, pipeline.SubjectOptions(labeling=_labeling(folder)))
        assert not list((out / "dki").glob("*.nii.gz"))
    finally:
        holder.kill()  # SIGKILL: no clean-up runs, the operating system releases the lock
        holder.wait()
    step = workflows.dki_step(inputs.dwi, out / "dki", maps=["mk"])
    assert step.ran and (out / "dki" / "mk.nii.gz").is_file()


def test_an_input_that_changes_while_it_is_read_is_never_recorded(tmp_path):
    source = tmp_path / "input.txt"
    source.write_text("first")

    def changing(folder):
        (folder / "out.txt").write_text(source.read_text())
        source.write_text("second")  # another program rewrites the input meanwhile
        return [folder / "out.txt"], {}

    with pytest.raises(InputError, match=r"input\(s\) source .*input\.txt changed while the step was reading"):
        workflows.run_step("test", tmp_path / "step", workflows.dki.DKIOptions(), {"source": source}, changing)
    assert not (tmp_path / "step" / workflows.RECORD).exists()

    def steady(folder):
        (folder / "out.txt").write_text(source.read_text())
        return [folder / "out.txt"], {}

    step = workflows.run_step("test", tmp_path / "step", workflows.dki.DKIOptions(), {"source": source}, steady)
    assert step.record["inputs"]["source"]["sha256"] == provenance.file_sha256(source)
    assert step.record["outputs"] == [
        {"path": "out.txt", "bytes": 6, "sha256": provenance.file_sha256(tmp_path / "step" / "out.txt")}
    ]


# ----------------------------------------------------------------------------------------------------------------
# 2. Damaged outputs are repaired; 8. what a killed run left is removed
# ----------------------------------------------------------------------------------------------------------------
def test_a_damaged_output_makes_its_step_run_again_and_leftovers_are_removed(dataset, tmp_path):
    folder, _ = dataset
    dwi = pipeline.find_subject(folder, "sub-01").dwi
    out = tmp_path / "dki"
    workflows.dki_step(dwi, out, maps=["mk", "md"])
    mk = io.load_image(out / "mk.nii.gz")[0]
    assert not workflows.dki_step(dwi, out, maps=["mk", "md"]).ran

    whole = (out / "mk.nii.gz").read_bytes()
    (out / "mk.nii.gz").write_bytes(whole[: len(whole) // 2])  # truncated
    (out / ".md.nii.gz.x1y2.tmp.nii.gz").write_bytes(b"half")  # what a killed write leaves
    (out / f"{registration.WORKDIR_PREFIX}k1ll3d").mkdir()
    step = workflows.dki_step(dwi, out, maps=["mk", "md"])
    assert step.ran
    np.testing.assert_array_equal(io.load_image(out / "mk.nii.gz")[0], mk)
    assert not list(out.glob(".*.tmp*")) and not list(out.glob(f"{registration.WORKDIR_PREFIX}*"))

    damaged = bytearray((out / "md.nii.gz").read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # same size, other bytes
    (out / "md.nii.gz").write_bytes(bytes(damaged))
    assert workflows.dki_step(dwi, out, maps=["mk", "md"]).ran
    assert not workflows.dki_step(dwi, out, maps=["mk", "md"]).ran


def test_a_failed_registration_leaves_no_work_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    image = np.random.default_rng(0).uniform(0, 1, (12, 12, 12)).astype(np.float32)
    with pytest.raises(Exception, match="(?i)transform"):
        registration.register(image, np.eye(4), image, np.eye(4), transform="NoSuchTransform")
    assert not list(tmp_path.glob(f"{registration.WORKDIR_PREFIX}*"))


def test_files_follow_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        io.save_image(tmp_path / "a.nii.gz", np.zeros((2, 2, 2)), np.eye(4))
        io.write_json(tmp_path / "a.json", {"a": 1})
        os.umask(0o022)
        io.write_table(tmp_path / "a.csv", [{"a": 1}])
    finally:
        os.umask(previous)
    assert (tmp_path / "a.nii.gz").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "a.csv").stat().st_mode & 0o777 == 0o644


# ----------------------------------------------------------------------------------------------------------------
# 3, 10, 11. Bad DWI: refused with the file named, or (non-finite samples) masked as the README says
# ----------------------------------------------------------------------------------------------------------------
def test_degenerate_and_damaged_dwi_are_refused_naming_the_file(dataset, tmp_path, capsys):
    folder, _ = dataset
    dwi = _copy_dwi(pipeline.find_subject(folder, "sub-01").dwi, tmp_path / "good_dwi.nii.gz")

    def run(name, data=None, bvals=None, extra=()):
        path = tmp_path / f"{name}_dwi.nii.gz"
        io.write_dwi(io.DWI(dwi.data if data is None else data, dwi.affine, dwi.bvals, dwi.bvecs), path)
        if bvals is not None:  # as a scanner's export would hold them (io.DWI itself refuses them)
            path.with_name(f"{name}_dwi.bval").write_text(" ".join(f"{b:g}" for b in bvals) + "\n")
        code = cli.main(["dki", str(path), "--out", str(tmp_path / f"out_{name}"), *extra])
        return code, capsys.readouterr()

    for name, data in (("zero", np.zeros_like(dwi.data)), ("negative", -np.abs(dwi.data) - 1)):
        code, printed = run(name, data)
        _assert_clear_error(code, printed.err, f"{name}_dwi.nii.gz", "hold no positive signal")
        assert not list((tmp_path / f"out_{name}").glob("*.nii.gz"))  # no all-zero maps

    empty = tmp_path / "empty_mask.nii.gz"
    io.save_image(empty, np.zeros(dwi.data.shape[:3]), dwi.affine)
    code, printed = run("masked", extra=["--mask", str(empty)])
    _assert_clear_error(code, printed.err, "empty_mask.nii.gz", "it is empty")

    shifted_affine = dwi.affine.copy()
    shifted_affine[1, 3] += 2.5
    shifted = tmp_path / "shifted_mask.nii.gz"
    io.save_image(shifted, np.ones(dwi.data.shape[:3]), shifted_affine)
    code, printed = run("shifted", extra=["--mask", str(shifted)])
    _assert_clear_error(code, printed.err, "shifted_mask.nii.gz", "origin shifted by (0, 2.5, 0) mm")

    code, printed = run("milliseconds", bvals=dwi.bvals / 1000)
    _assert_clear_error(code, printed.err, "milliseconds_dwi.nii.gz", "look like ms/µm²", "multiply them by 1000")

    one_shell = np.where(dwi.bvals > 1500, 1000.0, dwi.bvals)
    code, printed = run("oneshell", bvals=one_shell)
    _assert_clear_error(code, printed.err, "choose DTI only (--dti-only)")
    assert "dti_only=" not in printed.err

    # Non-finite samples are masked and counted, never passed on as NaN (the README's promise). Counted exactly
    # without the motion correction: with it, the holed volume's pose moves a little and with it which resampled
    # samples at the brain's edge clip to 0.
    still = ["--no-motion-correction"]
    code, printed = run("intact", extra=still)
    assert code == 0, printed.err
    holes = dwi.data.copy()
    holes[22:26, 27:31, 19:21, int(np.flatnonzero(dwi.bvals > 0)[0])] = np.nan  # 32 samples inside the brain
    code, printed = run("holes", holes, extra=still)
    assert code == 0, printed.err
    counts = [io.read_json(tmp_path / f"out_{n}" / workflows.RECORD)["results"] for n in ("intact", "holes")]
    assert counts[1]["invalid_signals"] == counts[0]["invalid_signals"] + 32
    assert np.all(np.isfinite(io.load_image(tmp_path / "out_holes" / "mk.nii.gz")[0]))
    code, printed = run("holes_corrected", holes)  # the default: the holes stay holes through the resampling
    assert code == 0, printed.err
    corrected = io.read_json(tmp_path / "out_holes_corrected" / workflows.RECORD)["results"]
    # (the resampled phantom also clips to 0 at its brain's sharp edge against a background of exact zeros: about
    # 10,600 samples more, all masked like the holes)
    assert corrected["motion_corrected"] and corrected["invalid_signals"] >= 32
    assert np.all(np.isfinite(io.load_image(tmp_path / "out_holes_corrected" / "mk.nii.gz")[0]))

    good = (tmp_path / "good_dwi.nii.gz").read_bytes()
    damaged = {"truncated_dwi.nii.gz": good[: len(good) // 2]}
    corrupted = bytearray(good)
    corrupted[len(good) // 2 : len(good) // 2 + 64] = bytes(64)
    damaged["crc_dwi.nii.gz"] = bytes(corrupted)
    raw = gzip.decompress(good)
    damaged["short_dwi.nii"] = raw[: len(raw) // 2]
    for name, content in damaged.items():
        path = tmp_path / name
        path.write_bytes(content)
        stem = io.strip_image_suffix(path)
        for suffix in (".bval", ".bvec"):
            shutil.copyfile(tmp_path / f"good_dwi{suffix}", stem.with_suffix(suffix))
        code = cli.main(["dki", str(path), "--out", str(tmp_path / "out_damaged")])
        _assert_clear_error(code, capsys.readouterr().err, name, "truncated or damaged")


# ----------------------------------------------------------------------------------------------------------------
# 12. QSM masks
# ----------------------------------------------------------------------------------------------------------------
def test_qsm_refuses_an_empty_mask_and_warns_of_a_tiny_automatic_one(tmp_path, capsys):
    rng = np.random.default_rng(3)
    magnitude = rng.uniform(0, 5, (48, 48, 48)).astype(np.float32)
    magnitude[18:32, 18:32, 18:32] += 400  # a 14-voxel "brain" in a large field of view
    phase = rng.normal(0, 0.05, magnitude.shape).astype(np.float32)
    for name, data in (("mag", magnitude), ("phase", phase)):
        io.save_image(tmp_path / f"{name}.nii.gz", data, np.eye(4))
    io.save_image(tmp_path / "empty.nii.gz", np.zeros(magnitude.shape), np.eye(4))
    base = ["qsm", "--magnitude", str(tmp_path / "mag.nii.gz"), "--phase", str(tmp_path / "phase.nii.gz")]
    base += ["--te", "0.015", "--b0", "3"]
    code = cli.main([*base, "--mask", str(tmp_path / "empty.nii.gz"), "--out", str(tmp_path / "a")])
    _assert_clear_error(code, capsys.readouterr().err, "empty.nii.gz", "it is empty")
    assert cli.main([*base, "--out", str(tmp_path / "b")]) == 0
    printed = capsys.readouterr().out
    assert "warning: GRE" in printed and "the automatic brain mask holds only" in printed
    record = io.read_json(tmp_path / "b" / workflows.RECORD)
    assert any("holds only" in warning for warning in record["results"]["warnings"])


# ----------------------------------------------------------------------------------------------------------------
# 10, 13, 14. Labelling: grids checked before registering, damaged atlas files named, atlas files recorded
# ----------------------------------------------------------------------------------------------------------------
def test_labelling_checks_grids_first_and_records_its_atlas_files(dataset, tmp_path, capsys):
    folder, atlas_args = dataset
    inputs = pipeline.find_subject(folder, "sub-01")
    dki = workflows.dki_step(inputs.dwi, tmp_path / "dki", maps=["fa"])
    fa = dki.folder / "fa.nii.gz"
    data, affine = io.load_image(fa)
    shifted = affine.copy()
    shifted[0, 3] += 4.0
    io.save_image(tmp_path / "wrong.nii.gz", data, shifted)
    code = cli.main(
        ["label", "--reference", str(fa), "--maps", f"fa={tmp_path / 'wrong.nii.gz'}", *atlas_args]
        + ["--out", str(tmp_path / "wrong_label")]
    )
    printed = capsys.readouterr()
    _assert_clear_error(code, printed.err, "map fa", "wrong.nii.gz", "origin shifted by (4, 0, 0) mm")
    assert "registering" not in printed.out  # refused before minutes of SyN

    template = Path(atlas_args[-1])
    damaged = tmp_path / "damaged_atlas"
    shutil.copytree(template, damaged)
    labels = damaged / atlas.BUILTIN_ATLASES["phantom"].labels
    labels.write_bytes(labels.read_bytes()[:-200])
    code = cli.main(
        ["label", "--reference", str(fa), "--atlas", "phantom", "--atlas-dir", str(damaged)]
        + ["--out", str(tmp_path / "damaged_label")]
    )
    _assert_clear_error(code, capsys.readouterr().err, str(labels), "truncated or damaged")

    step = workflows.label_step(fa, tmp_path / "label", _labeling(folder), maps={"fa": fa})
    recorded = step.record["inputs"]
    definition = atlas.BUILTIN_ATLASES["phantom"]
    for name, file in (
        ("atlas_labels", definition.labels),
        ("atlas_template", definition.template),
        ("atlas_template_fa", "template_FA.nii.gz"),
        ("atlas_table", definition.table),
    ):
        assert recorded[name] == {
            "path": str((template / file).resolve()),
            "sha256": provenance.file_sha256(template / file),
        }
    assert not list((tmp_path / "label").glob(f"{registration.WORKDIR_PREFIX}*"))


# ----------------------------------------------------------------------------------------------------------------
# 4. Diagnostic models
# ----------------------------------------------------------------------------------------------------------------
def _cohort_rows(seed=0):
    rng = np.random.default_rng(seed)
    return [
        {
            "participant_id": f"sub-{i + 1:02d}",
            "group": "ALS" if i < 12 else "control",
            "mk": rng.normal(1.045 if i < 12 else 1.09, 0.035),
            "ms": rng.normal(0.23 if i < 12 else 0.14, 0.06),
            "flat": 1.0,
        }
        for i in range(24)
    ]


def _strict_json(path):
    def refuse(constant):
        raise ValueError(f"{path}: non-standard JSON constant {constant}")

    return json.loads(Path(path).read_text(), parse_constant=refuse)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda m: m["scaler"].update(scale=[0.0, 1.0]), "scaler.scale"),
        (lambda m: m.update(cutoff=5), "cutoff"),
        (lambda m: m.update(coefficients=[float("inf"), 1.0]), "coefficients"),
        (lambda m: m.update(coefficients=["a", "b"]), "coefficients"),
        (lambda m: m.update(intercept="0.3"), "intercept"),
        (lambda m: m.update(markers="mk"), "markers"),
        (lambda m: m["training"]["control_sd"].update(mk=0), "training.control_sd.mk"),
        (lambda m: m["training"]["range"].update(ms=[1.0]), "training.range.ms"),
        (lambda m: m.pop("negative"), "negative"),
    ],
)
def test_a_tampered_model_is_refused_naming_the_file_and_field(tmp_path, capsys, change, field):
    cohort = stats.read_cohort(_cohort_rows(), markers=["mk", "ms"])
    model = stats.diagnostic_model(cohort, ["mk", "ms"])
    change(model)
    path = tmp_path / "model.json"
    path.write_text(json.dumps(model))  # as a hand edit would (Python writes inf as Infinity)
    with pytest.raises(InputError, match=rf"model {path}: (field )?.*{field.split('.')[0]}"):
        stats.load_model(path)
    io.write_table(tmp_path / "new.csv", [{"participant_id": "a", "mk": 1.0, "ms": 0.3}])
    code = cli.main(["classify", "--model", str(path), str(tmp_path / "new.csv")])
    _assert_clear_error(code, capsys.readouterr().err, str(path), field)
    assert not (tmp_path / "new_diagnosis.csv").exists()


def test_roc_refuses_a_degenerate_model_and_writes_standard_json(tmp_path, capsys):
    io.write_table(tmp_path / "cohort.csv", _cohort_rows())
    common = ["roc", str(tmp_path / "cohort.csv")]
    code = cli.main(
        [*common, "--markers", "flat", "--save-model", str(tmp_path / "m.json"), "--out", str(tmp_path / "a")]
    )
    _assert_clear_error(code, capsys.readouterr().err, "flat", "take one value in every control subject")
    assert not (tmp_path / "m.json").exists()
    assert cli.main([*common, "--markers", "mk", "flat", "--out", str(tmp_path / "b")]) == 0
    results = _strict_json(tmp_path / "b" / "results.json")  # the constant marker's infinite cut-off is null
    assert results["markers"]["flat"]["auc"] == 0.5 and results["markers"]["flat"]["threshold"] is None


# ----------------------------------------------------------------------------------------------------------------
# 5. Signals: workers die with their parent; SIGTERM stops cleanly
# ----------------------------------------------------------------------------------------------------------------
def _start_cohort(folder, atlas_args, out):
    command = _command("run-cohort", folder, "--out", out, "--workers", "2", *atlas_args)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    workers = []
    while time.monotonic() < deadline and process.poll() is None:
        workers = [p for p in child_processes(process.pid) if b"spawn_main" in _cmdline(p)]
        if len(workers) == 2 and len(list(out.glob("subjects/*/dki"))) == 2:
            return process, workers
        time.sleep(0.1)
    process.kill()
    pytest.fail(f"the workers did not start: {process.communicate()}")


def _cmdline(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _gone(pids, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if _cmdline(p)]
        if not alive:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the worker processes")
def test_workers_die_with_a_killed_parent_and_sigterm_stops_cleanly(dataset, tmp_path):
    folder, atlas_args = dataset
    process, workers = _start_cohort(folder, atlas_args, tmp_path / "killed")
    process.kill()  # SIGKILL to the parent alone
    process.communicate()
    assert _gone(workers), "orphaned workers went on computing"

    process, workers = _start_cohort(folder, atlas_args, tmp_path / "terminated")
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "interrupted (SIGTERM); run the same command again to resume" in err and "Traceback" not in err
    assert _gone(workers)
    assert not list((tmp_path / "terminated").rglob(".*.tmp*"))  # each worker unwound its writes
    assert not list((tmp_path / "terminated").rglob(f"{registration.WORKDIR_PREFIX}*"))


# ----------------------------------------------------------------------------------------------------------------
# 6, 7. A full disk and a read-only file system (a tmpfs in a private mount namespace)
# ----------------------------------------------------------------------------------------------------------------
def _private_tmpfs_works():
    if not shutil.which("unshare") or not sys.platform.startswith("linux"):
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", 'd=$(mktemp -d) && mount -t tmpfs -o size=1m none "$d" && umount "$d"'],
        capture_output=True,
    )
    return probe.returncode == 0


@pytest.mark.skipif(not _private_tmpfs_works(), reason="cannot mount a tmpfs in a private mount namespace here")
def test_full_and_read_only_disks_are_reported_with_the_path(dataset, tmp_path):
    folder, atlas_args = dataset
    done = tmp_path / "done"
    result = pipeline.run_cohort(
        folder,
        done,
        pipeline.SubjectOptions(labeling=_labeling(folder), gre_brain="magnitude"),
        workers=1,
        subjects=["sub-01"],
        echo=lambda line: None,
    )
    assert not result.failures
    dwi = pipeline.find_subject(folder, "sub-02").dwi
    mount, reports = tmp_path / "mnt", tmp_path / "reports"
    mount.mkdir()
    reports.mkdir()
    cohort = " ".join(_command("run-cohort", folder, "--workers", "1", *atlas_args, "--gre-brain", "magnitude"))
    EYE = "[[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]"
    script = textwrap.dedent(
        f"""
        set -u
        M={mount}; R={reports}
        mount -t tmpfs -o size=48m none "$M" || exit 97
        cp -a {done} "$M/out"
        dd if=/dev/zero of="$M/fill" bs=1M >/dev/null 2>&1
        run() {{ name=$1; shift; "$@" >"$R/$name.out" 2>"$R/$name.err"; echo $? >"$R/$name.rc"; }}
        run rerun {cohort} --subjects sub-01 --out "$M/out"
        run dki {" ".join(_command("dki", dwi))} --out "$M/new"
        run more {cohort} --subjects sub-01 sub-02 --out "$M/out"
        run save {sys.executable} -c "from ALSQuantLib import io; io.save_image('$M/out/x.nii.gz', [[[0]]], {EYE})"
        ls "$M/out" > "$R/listing"
        mount -o remount,ro "$M"
        run readonly {" ".join(_command("dki", dwi))} --out "$M/ro"
        """
    )
    subprocess.run(["unshare", "-rm", "bash", "-c", script], check=False, timeout=600)

    def report(name):
        return (
            int((reports / f"{name}.rc").read_text()),
            (reports / f"{name}.out").read_text(),
            (reports / f"{name}.err").read_text(),
        )

    code, printed, err = report("rerun")  # a finished subject on a full disk: nothing to write, success
    assert code == 0, err
    assert "sub-01 already done" in printed and "Traceback" not in err
    code, _, err = report("dki")
    _assert_clear_error(code, err, f"no space left on device: {mount}/new")
    code, printed, err = report("more")
    assert code in (1, 2) and "no space left on device" in printed + err
    assert "Traceback" not in err and "Logging error" not in err and err.count("\n") < 5, err
    assert "cohort.csv" in (reports / "listing").read_text()  # the previous table is still there
    code, _, err = report("save")
    assert code == 1 and f"OutputError: no space left on device: {mount}/out/x.nii.gz" in err
    code, _, err = report("readonly")
    _assert_clear_error(code, err, f"{mount}/ro", "read-only file system")


def test_an_output_folder_that_is_a_file_is_refused_before_computing(dataset, tmp_path, capsys):
    folder, _ = dataset
    (tmp_path / "file").write_text("not a folder")
    code = cli.main(["dki", str(pipeline.find_subject(folder, "sub-01").dwi), "--out", str(tmp_path / "file")])
    _assert_clear_error(code, capsys.readouterr().err, f"{tmp_path / 'file'}: it is a file, not a folder")


# ----------------------------------------------------------------------------------------------------------------
# 14. Downloads: https only (loopback http for tests), no cross-host redirects, only verified files used
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture
def redirecting_server(tmp_path):
    """A real HTTP server on loopback that serves ``/file`` and redirects ``/elsewhere`` to another host name."""
    payload = b"atlas bytes"

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/file":
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            else:
                port = self.server.server_address[1]
                target = {"/elsewhere": f"http://localhost:{port}/file", "/same": f"http://127.0.0.1:{port}/file"}
                self.send_response(302)
                self.send_header("Location", target[self.path])
                self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", payload
    server.shutdown()
    server.server_close()


def test_downloads_are_https_same_host_and_verified(redirecting_server, tmp_path):
    import hashlib

    base, payload = redirecting_server
    digest = hashlib.sha256(payload).hexdigest()
    for url in ("http://example.org/atlas.nii.gz", f"file://{tmp_path}/atlas.nii.gz", "ftp://example.org/a"):
        with pytest.raises(InputError, match="expected an https:// address"):
            atlas.fetch(url, digest, tmp_path / "cache")
    with pytest.raises(InputError, match="redirected to another host"):
        atlas.fetch(f"{base}/elsewhere", digest, tmp_path / "cache", filename="a")
    assert atlas.fetch(f"{base}/same", digest, tmp_path / "cache", filename="b").read_bytes() == payload
    assert not list((tmp_path / "cache").glob(".*"))


def test_an_unlisted_fa_template_in_the_cache_is_not_used(tmp_path):
    template = tmp_path / "served"
    phantom.write_template(template, SMALL)
    files_dir = template / phantom.TRUTH_DIR / "template"
    definition = atlas.BUILTIN_ATLASES["phantom"]
    cache = tmp_path / "cache"
    target = cache / "atlases" / "phantom"
    target.mkdir(parents=True)
    # Listed files already in the cache are verified by their checksum (no download needed); the FA template is not
    # listed, so the copy sitting beside them must not be used.
    files = {}
    for name in (definition.template, definition.labels, definition.table, "template_FA.nii.gz"):
        shutil.copyfile(files_dir / name, target / name)
        url = f"http://127.0.0.1:9/{name}"  # the discard port: nothing answers, so nothing can be downloaded
        files[name] = {"url": url, "sha256": provenance.file_sha256(files_dir / name)}
    listed_without_fa = {"files": {k: v for k, v in files.items() if k != "template_FA.nii.gz"}}
    found = atlas.find_atlas("phantom", sources=listed_without_fa, cache_dir=cache)
    assert found.labels == target / definition.labels and found.template_fa is None
    found = atlas.find_atlas("phantom", sources={"files": files}, cache_dir=cache)
    assert found.template_fa == target / "template_FA.nii.gz"
    with open(target / "template_FA.nii.gz", "ab") as handle:
        handle.write(b"tampered")  # no longer what the sources list: fetched again, which fails here
    with pytest.raises(InputError, match="download http://127.0.0.1:9/template_FA.nii.gz failed"):
        atlas.find_atlas("phantom", sources={"files": files}, cache_dir=cache)


def test_output_errors_name_the_path(tmp_path):
    err = outputs.os_error(OSError(28, "No space left on device"), tmp_path / "x")
    assert isinstance(err, OutputError) and str(err) == f"no space left on device: {tmp_path / 'x'}"
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    with pytest.raises(OutputError, match=f"{blocker}: it is a file"):
        outputs.prepare_folder(blocker)
    nib_path = tmp_path / "plain.nii"
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), nib_path)
    assert io.image_grid(nib_path)[0] == (2, 2, 2)
