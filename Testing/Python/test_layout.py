"""The package installs as a library and a command, and the library stays free of Slicer, Qt and VTK."""

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import ALSQuantLib

FORBIDDEN = {"slicer", "qt", "ctk", "vtk", "PythonQt", "vtkmodules", "mrml"}
LIB_DIR = Path(ALSQuantLib.__file__).parent


def test_no_forbidden_import_statement_in_library():
    offenders = []
    for path in LIB_DIR.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert offenders == []


def test_importing_every_library_module_loads_no_slicer_qt_or_vtk():
    modules = [f"ALSQuantLib.{m.name}" for m in pkgutil.iter_modules([str(LIB_DIR)])]
    assert "ALSQuantLib.geometry" in modules and "ALSQuantLib.phantom" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {sorted(FORBIDDEN)!r})\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_bare_import_is_light():
    code = "import sys, ALSQuantLib; print(','.join(m for m in ('ants', 'dipy', 'matplotlib') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_console_script_is_installed_and_answers():
    script = Path(sys.executable).parent / "alsquant"  # installed beside the interpreter, as pip puts it
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True)
    assert result.returncode == 0
    assert ALSQuantLib.__version__ in result.stdout


PROJECT = LIB_DIR.parent


def test_ci_runs_the_readme_test_command():
    readme = (PROJECT / "README.md").read_text()
    ci = (PROJECT / ".ci" / "run").read_text()
    command = next(line.strip() for line in ci.splitlines() if "pytest" in line)
    assert command in readme
    assert "alsquant demo" in readme


def test_demo_runs_the_whole_pipeline_and_resumes(tmp_path, capsys):
    from ALSQuantLib import cli, io

    assert cli.main(["demo", "--als", "3", "--controls", "3", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "3 ALS, 3 control" in out
    measured = io.read_table(tmp_path / "demo" / "markers.csv")
    assert len(measured) == 6
    # measured through the atlas registration, close to each subject's truth
    for row in measured:
        assert float(row["cst_mk"]) == pytest.approx(float(row["true_cst_mk"]), abs=0.05)
        assert float(row["cst_dice"]) > 0.75  # 0.84-0.91 across the 35 demo subjects
        assert float(row["m1_dice"]) > 0.75  # M1 in grey matter: 0.90-0.96 across the 35 demo subjects
        # QSM ran and reads M1 near its truth (with one Bregman iteration, the default: one of these six subjects
        # 1.01 x its truth; the phantom cohort's slope across subjects 0.88)
        assert float(row["m1_ms"]) == pytest.approx(float(row["true_m1_chi"]), rel=0.25)
    results = io.read_json(tmp_path / "demo" / "roc" / "results.json")
    assert set(results["markers"]) == {"cst_mk", "cst_md", "cst_fa", "m1_ms"}
    assert "cst_mk+m1_ms" in results["combinations"]
    assert (tmp_path / "demo" / "roc" / "report.html").is_file()
    assert (tmp_path / "demo" / "demo_summary.txt").read_text() in out
    # run-cohort's table feeds `alsquant roc` as it is.
    roc_args = [
        "roc",
        str(tmp_path / "demo" / "pipeline" / "cohort.csv"),
        "--subject-column",
        "participant_id",
        "--markers",
        "cst_mk",
        "m1_ms",
        "--combine",
        "cst_mk+m1_ms",
        "--out",
        str(tmp_path / "roc"),
    ]
    assert cli.main(roc_args) == 0
    assert (
        io.read_json(tmp_path / "roc" / "results.json")["markers"]["cst_mk"]["auc"]
        == results["markers"]["cst_mk"]["auc"]
    )
    capsys.readouterr()
    # A second run finds the cohort and every stage current, and gives the same numbers.
    assert cli.main(["demo", "--als", "3", "--controls", "3", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "Using the cohort simulated earlier" in out and out.count("already done") == 6
    assert io.read_table(tmp_path / "demo" / "markers.csv") == measured
    assert cli.main(["demo", "--als", "2", "--out", str(tmp_path / "small")]) == 2
    assert not (tmp_path / "small").exists()  # refused before any work


# The library's layers, lowest first: a module imports only from layers below its own (the atlas package's modules
# also import each other). The simulator is test infrastructure: only the demo and the command line import it.
LAYERS = (
    {"errors"},
    {"progress", "options", "geometry", "outputs"},
    {"io", "dipole", "metrics", "provenance", "masks"},
    {"registration", "dicom", "derivatives"},
    {"motion"},
    {"dki", "qsm", "atlas", "stats"},
    {"report"},
    {"workflows"},
    {"pipeline"},
    {"phantom"},
    {"anatomy"},
    {"demo"},
    {"cli"},
)
SIMULATION_USERS = {"anatomy", "demo", "cli"}


def _library_imports():
    """(importing module, imported module) for every relative import of the library, at any depth."""
    pairs = []
    for path in LIB_DIR.rglob("*.py"):
        relative = path.relative_to(LIB_DIR)
        in_package = len(relative.parts) > 1
        owner = relative.parts[0] if in_package else path.stem
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.ImportFrom) or node.level == 0:
                continue
            if in_package and node.level == 1:
                continue  # a sibling inside the package
            names = [node.module.split(".")[0]] if node.module else [alias.name for alias in node.names]
            pairs += [(owner, name) for name in names if name not in ("__init__",)]
    return pairs


def test_library_imports_go_one_way():
    layer = {name: n for n, names in enumerate(LAYERS) for name in names}
    modules = {p.stem for p in LIB_DIR.glob("*.py")} | {
        p.name for p in LIB_DIR.iterdir() if (p / "__init__.py").is_file()
    }
    assert modules - {"__init__"} == set(layer), "every library module has a layer"
    upward = [(a, b) for a, b in _library_imports() if b in layer and layer[b] >= layer[a] and a != b]
    assert upward == []
    assert {a for a, b in _library_imports() if b == "phantom"} <= SIMULATION_USERS


def test_slicer_modules_do_not_reach_into_the_command_line():
    for path in (PROJECT / "ALSQuant").rglob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert not {m for m in imported if m.startswith(("ALSQuantLib.cli", "ALSQuantLib.demo"))}, path


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]])
def test_code_is_linted_and_formatted(command):
    """The house rules (pyproject.toml's [tool.ruff]: line length 120, pycodestyle, pyflakes, import order,
    bugbear, pyupgrade) hold for every Python file."""
    ruff = Path(sys.executable).parent / "ruff"
    if not ruff.exists():
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    result = subprocess.run([str(ruff), *command, str(PROJECT)], capture_output=True, text=True, cwd=PROJECT)
    assert result.returncode == 0, result.stdout + result.stderr
