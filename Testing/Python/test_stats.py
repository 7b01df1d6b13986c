"""ALSQuantLib.stats against R's pROC (when Rscript and pROC are installed), analytic cases and simulations."""

import json
import shutil
import subprocess

import numpy as np
import pytest

from ALSQuantLib import stats
from ALSQuantLib.errors import InputError


def cohort_rows(seed=0, n_als=20, n_controls=15):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_als + n_controls):
        als = i < n_als
        rows.append(
            {
                "subject": f"sub-{i + 1:02d}",
                "group": "ALS" if als else "control",
                "mk": rng.normal(1.045 if als else 1.09, 0.035),
                "ms": rng.normal(0.23 if als else 0.14, 0.06),
                "fa": rng.normal(0.6, 0.03),
            }
        )
    return rows


def test_auc_and_delong_variance_worked_by_hand():
    # cases 3, 4 and controls 1, 2, 3.5: of the 6 pairs, case > control in 5 → AUC 5/6
    values = np.array([3.0, 4.0, 1.0, 2.0, 3.5])
    positive = np.array([True, True, False, False, False])
    aucs, cov = stats.delong(values, positive)
    assert aucs[0] == pytest.approx(5 / 6)
    # DeLong by its definition: V10_i = mean_j ψ(x_i, y_j), V01_j = mean_i ψ(x_i, y_j)
    x, y = values[positive], values[~positive]
    psi = (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])
    expected = np.var(psi.mean(axis=1), ddof=1) / x.size + np.var(psi.mean(axis=0), ddof=1) / y.size
    assert cov[0, 0] == pytest.approx(expected)


def test_fast_delong_equals_the_definition_with_ties():
    rng = np.random.default_rng(1)
    scores = np.round(rng.normal(size=(3, 40)), 1)  # many ties
    positive = rng.random(40) < 0.45
    aucs, cov = stats.delong(scores, positive)
    x, y = scores[:, positive], scores[:, ~positive]
    psi = (x[:, :, None] > y[:, None, :]) + 0.5 * (x[:, :, None] == y[:, None, :])
    v10, v01 = psi.mean(axis=2), psi.mean(axis=1)
    np.testing.assert_allclose(aucs, psi.mean(axis=(1, 2)))
    np.testing.assert_allclose(cov, np.cov(v10) / x.shape[1] + np.cov(v01) / y.shape[1])


def test_holm_worked_by_hand():
    np.testing.assert_allclose(stats.holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])


def test_cohort_errors_name_the_rows():
    rows = cohort_rows()
    rows[3]["group"] = ""
    with pytest.raises(InputError, match="no group for subject.*sub-04"):
        stats.read_cohort(rows, markers=["mk"])
    rows = cohort_rows()
    rows[5]["mk"] = "n/a"
    with pytest.raises(InputError, match="'mk' is missing or not numeric for subject.*sub-06"):
        stats.read_cohort(rows, markers=["mk"])
    with pytest.raises(InputError, match="no subject in the positive group 'ALS'"):
        stats.read_cohort([r for r in cohort_rows() if r["group"] == "control"], markers=["mk"])
    with pytest.raises(InputError, match="group 'ALS' has 2 subject"):
        stats.read_cohort(cohort_rows(n_als=2), markers=["mk"])
    with pytest.raises(InputError, match="no column 'md'"):
        stats.read_cohort(cohort_rows(), markers=["md"])


def test_group_comparison_follows_the_simulated_pattern():
    cohort = stats.read_cohort(cohort_rows(), markers=["mk", "ms", "fa"])
    rows = {r["marker"]: r for r in stats.group_comparison(cohort)}
    cases, controls = cohort.markers["mk"][cohort.positive], cohort.markers["mk"][~cohort.positive]
    assert rows["mk"]["cliffs_delta"] == pytest.approx(np.mean(np.sign(cases[:, None] - controls[None, :])))
    assert rows["mk"]["ALS_median"] < rows["mk"]["control_median"] and rows["mk"]["cliffs_delta"] < 0
    assert rows["ms"]["ALS_median"] > rows["ms"]["control_median"] and rows["ms"]["holm_p"] < 0.01
    assert rows["fa"]["holm_p"] > 0.05  # no FA change
    assert rows["mk"]["holm_p"] >= rows["mk"]["mannwhitney_p"]


def test_combined_marker_beats_singles_and_shows_optimism():
    cohort = stats.read_cohort(cohort_rows(seed=2), markers=["mk", "ms"])
    single = {m: stats.roc_analysis(cohort.markers[m], cohort.positive).auc for m in ("mk", "ms")}
    combined = stats.combine(cohort, ["mk", "ms"])
    assert combined["roc"].auc > max(single.values())
    assert combined["auc_cv"] < combined["roc"].auc  # cross-validation removes the optimism of refitting
    assert set(combined["delong_p_vs"]) == {"mk", "ms"}


def test_diagnostic_model_round_trips_through_json(tmp_path):
    cohort = stats.read_cohort(cohort_rows(seed=3), markers=["mk", "ms"])
    model = stats.diagnostic_model(cohort, ["mk", "ms"])
    stats.save_model(model, tmp_path / "model.json")
    loaded = stats.load_model(tmp_path / "model.json")
    subject = {"mk": 1.00, "ms": 0.30}
    assert stats.classify(loaded, subject) == stats.classify(model, subject)
    result = stats.classify(loaded, subject)
    assert result["decision"] == "ALS" and result["probability"] > 0.9
    assert result["z_scores"]["mk"] < -2 and result["out_of_range"] == []
    healthy = stats.classify(loaded, {"mk": 1.12, "ms": 0.10})
    assert healthy["decision"] == "control"
    assert stats.classify(loaded, {"mk": 1.5, "ms": 0.1})["out_of_range"] == ["mk"]
    with pytest.raises(InputError, match="no value for marker"):
        stats.classify(loaded, {"mk": 1.0})
    (tmp_path / "bad.json").write_text(json.dumps({"markers": ["mk"]}))
    with pytest.raises(InputError, match="not an ALSQuant diagnostic model"):
        stats.load_model(tmp_path / "bad.json")


R_SCRIPT = r"""
suppressMessages(library(pROC))
d <- read.csv(commandArgs(TRUE)[1])
d$y <- factor(d$group, levels = c("control", "ALS"))
out <- c()
for (m in c("mk", "ms")) {
  r <- roc(d$y, d[[m]], levels = c("control", "ALS"), direction = "auto", quiet = TRUE)
  ci <- ci.auc(r, method = "delong")
  b <- coords(r, "best", best.method = "youden", ret = c("threshold", "sensitivity", "specificity"), transpose = TRUE)
  fmt <- paste0('"%s": {"auc": %.12f, "ci_low": %.12f, "ci_high": %.12f, "direction": "%s", ',
                '"threshold": %.12f, "sensitivity": %.12f, "specificity": %.12f}')
  out <- c(out, sprintf(fmt, m, as.numeric(r$auc), ci[1], ci[3], r$direction, b[1], b[2], b[3]))
}
r1 <- roc(d$y, d$mk, levels = c("control", "ALS"), direction = "auto", quiet = TRUE)
r2 <- roc(d$y, d$ms, levels = c("control", "ALS"), direction = "auto", quiet = TRUE)
t <- roc.test(r1, r2, method = "delong")
out <- c(out, sprintf('"test": {"z": %.12f, "p": %.12f}', t$statistic, t$p.value))
cat("{", paste(out, collapse = ", "), "}\n")
"""


def test_agrees_with_proc(tmp_path):
    if shutil.which("Rscript") is None:
        pytest.skip("Rscript not installed (Debian: r-cran-proc)")
    from ALSQuantLib import io

    check = subprocess.run(["Rscript", "-e", "library(pROC)"], capture_output=True)
    if check.returncode != 0:
        pytest.skip("R package pROC not installed (Debian: r-cran-proc)")
    rows = cohort_rows(seed=4)
    io.write_table(tmp_path / "cohort.csv", rows)
    (tmp_path / "check.R").write_text(R_SCRIPT)
    output = subprocess.run(
        ["Rscript", str(tmp_path / "check.R"), str(tmp_path / "cohort.csv")], capture_output=True, text=True, check=True
    )
    reference = json.loads(output.stdout)
    cohort = stats.read_cohort(tmp_path / "cohort.csv", markers=["mk", "ms"])
    for marker in ("mk", "ms"):
        ours = stats.roc_analysis(cohort.markers[marker], cohort.positive).summary()
        theirs = reference[marker]
        assert ours["direction"] == theirs["direction"]
        for key in ("auc", "ci_low", "ci_high", "threshold", "sensitivity", "specificity"):
            assert ours[key] == pytest.approx(theirs[key], abs=1e-6), (marker, key)
    mk, _ = stats.orient(cohort.markers["mk"], cohort.positive)
    ms, _ = stats.orient(cohort.markers["ms"], cohort.positive)
    z, p = stats.delong_test(mk, ms, cohort.positive)
    assert z == pytest.approx(reference["test"]["z"], abs=1e-6)
    assert p == pytest.approx(reference["test"]["p"], abs=1e-6)


def test_roc_and_classify_commands(tmp_path, capsys):
    from ALSQuantLib import cli, io

    io.write_table(tmp_path / "cohort.csv", cohort_rows(seed=5))
    out = tmp_path / "roc"
    code = cli.main(
        [
            "roc",
            str(tmp_path / "cohort.csv"),
            "--markers",
            "mk",
            "ms",
            "fa",
            "--combine",
            "mk+ms",
            "--bootstrap",
            "200",
            "--save-model",
            str(tmp_path / "model.json"),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    results = io.read_json(out / "results.json")
    assert set(results["markers"]) == {"mk", "ms", "fa"} and results["groups"] == {"ALS": 20, "control": 15}
    for key in ("auc", "ci_low", "ci_high", "direction", "threshold", "sensitivity", "specificity", "mannwhitney_p"):
        assert key in results["markers"]["mk"]
    combination = results["combinations"]["mk+ms"]
    assert {"auc_apparent", "ci_low", "ci_high", "auc_cv", "delong_p_vs"} <= set(combination)
    assert results["markers"]["mk"]["direction"] == ">" and results["markers"]["ms"]["direction"] == "<"
    for name in (
        "report.html",
        "roc_curves.png",
        "roc_curves.svg",
        "groups.png",
        "group_comparison.csv",
        "roc_markers.csv",
    ):
        assert (out / name).is_file()
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and "mk+ms" in page
    io.write_table(
        tmp_path / "new.csv",
        [{"subject": "new-1", "mk": 1.00, "ms": 0.32}, {"subject": "new-2", "mk": 1.11, "ms": 0.09}],
    )
    assert cli.main(["classify", "--model", str(tmp_path / "model.json"), str(tmp_path / "new.csv")]) == 0
    diagnosis = io.read_table(tmp_path / "new_diagnosis.csv")
    assert [d["decision"] for d in diagnosis] == ["ALS", "control"]
    assert (
        cli.main(
            ["roc", str(tmp_path / "cohort.csv"), "--markers", "mk", "--combine", "mk+md", "--out", str(tmp_path / "x")]
        )
        == 2
    )
    assert "combination 'mk+md'" in capsys.readouterr().err


def test_cohort_from_a_dataframe_matches_the_csv(tmp_path):
    pandas = pytest.importorskip("pandas")
    from ALSQuantLib import io

    rows = cohort_rows(seed=6)
    io.write_table(tmp_path / "c.csv", rows)
    from_csv = stats.read_cohort(tmp_path / "c.csv", markers=["mk", "ms"])
    from_frame = stats.read_cohort(pandas.DataFrame(rows), markers=["mk", "ms"])
    assert from_frame.subjects == from_csv.subjects
    np.testing.assert_array_equal(from_frame.positive, from_csv.positive)
    np.testing.assert_allclose(from_frame.markers["mk"], from_csv.markers["mk"], rtol=1e-12)
    frame = pandas.DataFrame(rows)
    frame.loc[2, "ms"] = np.nan
    with pytest.raises(InputError, match="sub-03"):
        stats.read_cohort(frame, markers=["ms"])
