"""ALSQuantLib.stats against R's pROC (when Rscript and pROC are installed), analytic cases and simulations."""

import json
import shutil
import subprocess

import numpy as np
import pytest
from scipy import stats as sps

from ALSQuantLib import stats
from ALSQuantLib.errors import InputError


def cohort_rows(seed=0, n_als=20, n_controls=15):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_als + n_controls):
        als = i < n_als
        rows.append(
            {
                "participant_id": f"sub-{i + 1:02d}",
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

    with pytest.raises(InputError, match="no column 'participant_id'"):
        stats.read_cohort([{**{"subject": r.pop("participant_id")}, **r} for r in cohort_rows()], markers=["mk"])


def test_a_three_group_cohort_with_failed_qc_is_reduced_and_says_so(tmp_path, capsys):
    """An ALS/PLS/control cohort as run-cohort writes it (qc_passed column): --groups picks two, failed QC is left
    out by default, both are said; the statistics are those of the reduced table."""
    from ALSQuantLib import cli, io

    rows = cohort_rows(seed=10, n_als=12, n_controls=10)
    rows += [{**r, "participant_id": f"pls-{k}", "group": "PLS"} for k, r in enumerate(cohort_rows(seed=11)[:4])]
    for k, row in enumerate(rows):
        row["qc_passed"] = k not in (2, 15)  # sub-03 (ALS) and sub-16 (control) failed
    with pytest.raises(InputError, match="expected 'ALS' and one other group, found ALS, PLS, control"):
        stats.read_cohort(rows, markers=["mk"])
    cohort = stats.read_cohort(rows, markers=["mk"], groups=["ALS", "control"])
    assert (cohort.n_positive, cohort.n_negative) == (11, 9)
    assert cohort.excluded == {"failed_qc": ["sub-03", "sub-16"], "other_group": [f"pls-{k}" for k in range(4)]}
    kept = [r for k, r in enumerate(rows) if r["group"] != "PLS" and k not in (2, 15)]
    expected = stats.read_cohort(kept, markers=["mk"])
    np.testing.assert_array_equal(cohort.markers["mk"], expected.markers["mk"])
    everyone = stats.read_cohort(rows, markers=["mk"], groups=["ALS", "control"], exclude_failed_qc=False)
    assert (everyone.n_positive, everyone.n_negative) == (12, 10)
    with pytest.raises(InputError, match="groups ALS, MND asked for"):
        stats.read_cohort(rows, markers=["mk"], groups=["ALS", "MND"])
    io.write_table(tmp_path / "cohort.csv", rows)
    args = ["roc", str(tmp_path / "cohort.csv"), "--markers", "mk", "--groups", "ALS,control", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    assert "left out: 2 whose quality check failed: sub-03, sub-16; 4 of other groups" in capsys.readouterr().out
    results = io.read_json(tmp_path / "results.json")
    assert results["groups"] == {"ALS": 11, "control": 9} and results["excluded"]["failed_qc"] == ["sub-03", "sub-16"]
    assert "left out: 2 whose quality check failed" in (tmp_path / "report.html").read_text()


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


def _run_r(script, table, folder):
    """`script` run by Rscript on `table` (rows, written as CSV); its JSON output. Skips without R and pROC."""
    if shutil.which("Rscript") is None:
        pytest.skip("Rscript not installed (Debian: r-cran-proc)")
    from ALSQuantLib import io

    check = subprocess.run(["Rscript", "-e", "library(pROC)"], capture_output=True)
    if check.returncode != 0:
        pytest.skip("R package pROC not installed (Debian: r-cran-proc)")
    io.write_table(folder / "cohort.csv", table)
    (folder / "check.R").write_text(script)
    output = subprocess.run(
        ["Rscript", str(folder / "check.R"), str(folder / "cohort.csv")], capture_output=True, text=True, check=True
    )
    return json.loads(output.stdout)


def test_agrees_with_proc(tmp_path):
    reference = _run_r(R_SCRIPT, cohort_rows(seed=4), tmp_path)
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


R_BAND_SCRIPT = r"""
suppressMessages(library(pROC))
d <- read.csv(commandArgs(TRUE)[1])
r <- roc(d$group, d$mk, levels = c("control", "ALS"), quiet = TRUE)
set.seed(1)
band <- ci.se(r, specificities = (0:20) / 20, boot.n = 10000, progress = "none")
cat(sprintf('{"direction": "%s", "low": [%s], "high": [%s]}\n', r$direction,
    paste(sprintf("%.17g", band[, 1]), collapse = ", "), paste(sprintf("%.17g", band[, 3]), collapse = ", ")))
"""


def test_roc_confidence_band_agrees_with_proc(tmp_path):
    """The band of the ROC curve (sensitivity CI at fixed specificities) against pROC's ci.se. Both bootstrap with
    their own random numbers: the sensitivities move in steps of 1/20 (20 cases), and a percentile landing on a step
    may fall either side of it, so single points may differ by one step (measured: 1 to 4 of 42 with 10,000 or 20,000
    resamples each), never more. Every specificity here is one the curve reaches (20 controls), so the rule at
    vertical steps counts: the lowest sensitivity there instead of pROC's highest differs at 24 of 42."""
    reference = _run_r(R_BAND_SCRIPT, cohort_rows(seed=4, n_controls=20), tmp_path)
    cohort = stats.read_cohort(tmp_path / "cohort.csv", markers=["mk"])
    roc = stats.roc_analysis(cohort.markers["mk"], cohort.positive)
    assert roc.direction == reference["direction"]
    band = stats.sensitivity_band(cohort.markers["mk"], cohort.positive, roc.direction, n_resamples=10000)
    difference = np.abs(np.r_[band["low"] - reference["low"], band["high"] - reference["high"]])
    assert difference.max() <= 1 / 20 + 1e-9 and (difference > 1e-9).sum() <= 6, difference
    assert np.all(band["low"] <= band["high"]) and band["low"][0] == 1 and band["high"][-1] < 1


R_STATS_SCRIPT = r"""
suppressMessages(library(pROC))
d <- read.csv(commandArgs(TRUE)[1])
d$y <- factor(d$group, levels = c("control", "ALS"))
out <- c()
for (m in c("mk", "ms", "mk_rounded")) {
  w <- suppressWarnings(wilcox.test(d[[m]][d$y == "ALS"], d[[m]][d$y == "control"]))
  out <- c(out, sprintf('"%s": {"w": %.12f, "p": %.17g}', m, w$statistic, w$p.value))
}
fit <- glm(y ~ mk + ms, family = binomial, data = d)
r <- roc(d$y, predict(fit), levels = c("control", "ALS"), direction = "<", quiet = TRUE)
ci <- ci.auc(r, method = "delong")
out <- c(out, sprintf('"glm": {"coef": [%s], "auc": %.12f, "ci_low": %.12f, "ci_high": %.12f}',
                      paste(sprintf("%.17g", coef(fit)), collapse = ", "), as.numeric(r$auc), ci[1], ci[3]))
out <- c(out, sprintf('"table_one": {"age_p": %.17g, "sex_p": %.17g}',
                      wilcox.test(d$age[d$y == "ALS"], d$age[d$y == "control"])$p.value,
                      fisher.test(table(d$y, d$sex))$p.value))
f <- lm(mk ~ age + sex, data = d[d$y == "control", ])
out <- c(out, sprintf('"lm": {"coef": [%s], "sigma": %.17g}',
                      paste(sprintf("%.17g", coef(f)), collapse = ", "), summary(f)$sigma))
cat("{", paste(out, collapse = ", "), "}\n")
"""


@pytest.mark.parametrize("n_als, n_controls", [(20, 15), (55, 52)])
def test_mann_whitney_and_the_combined_marker_agree_with_r(tmp_path, n_als, n_controls):
    """R's wilcox.test (exact below 50 a group without ties, else the normal approximation with continuity and tie
    corrections: both branches, the tied column being MK rounded to 0.01) and glm's maximum-likelihood logistic
    regression, with pROC's AUC of its linear predictor; the age and sex adjustment's least-squares fit, lm's;
    Table 1's tests, wilcox.test and fisher.test."""
    rows = cohort_rows(seed=8, n_als=n_als, n_controls=n_controls)
    rng = np.random.default_rng(8)
    for row in rows:
        row.update(mk_rounded=round(row["mk"], 2), age=round(rng.uniform(30, 80), 1), sex=rng.choice(["F", "M"]))
    reference = _run_r(R_STATS_SCRIPT, rows, tmp_path)
    cohort = stats.read_cohort(rows, markers=["mk", "ms", "mk_rounded"])
    comparison = {row["marker"]: row for row in stats.group_comparison(cohort)}
    for marker in ("mk", "ms", "mk_rounded"):
        ours, theirs = comparison[marker], reference[marker]
        assert ours["mannwhitney_u"] == theirs["w"], marker
        assert ours["mannwhitney_p"] == pytest.approx(theirs["p"], rel=1e-6, abs=1e-300), marker
        exact = n_als < 50 and n_controls < 50 and marker != "mk_rounded"
        assert ours["mannwhitney_method"] == ("exact" if exact else "normal approximation")
    combined = stats.combine(cohort, ["mk", "ms"], cv_repeats=2)
    assert not combined["separated"]
    intercept, coefficients = stats.raw_coefficients(*combined["model"])
    np.testing.assert_allclose([intercept, *coefficients], reference["glm"]["coef"], rtol=1e-6)
    for key, value in (("auc", combined["roc"].auc), ("ci_low", combined["roc"].ci_low)):
        assert value == pytest.approx(reference["glm"][key], abs=1e-6), key
    assert combined["roc"].ci_high == pytest.approx(reference["glm"]["ci_high"], abs=1e-6)
    # Table 1: age by wilcox.test, sex by fisher.test, medians and quartiles as R's quantile (type 7)
    table = {row["characteristic"]: row for row in stats.table_one(cohort)}
    assert set(table) == {"age, median [IQR]", "sex, n (%)"}
    assert table["age, median [IQR]"]["p"] == pytest.approx(reference["table_one"]["age_p"], rel=1e-6)
    assert table["sex, n (%)"]["p"] == pytest.approx(reference["table_one"]["sex_p"], rel=1e-6)
    ages = np.array([r["age"] for r in rows if r["group"] == "ALS"])
    q1, median, q3 = np.percentile(ages, [25, 50, 75])
    assert table["age, median [IQR]"]["ALS"] == f"{median:.4g} [{q1:.4g}-{q3:.4g}] (n = {n_als})"
    women = sum(r["sex"] == "F" for r in rows if r["group"] == "control")
    share = f"{100 * women / n_controls:.0f} %"
    assert table["sex, n (%)"]["control"].startswith(f"F {women} ({share}); M {n_controls - women}")
    # the age and sex adjustment's fit in the controls is lm's
    adjustment = stats.fit_adjustment(stats.read_cohort(rows, markers=["mk"], covariates=["age", "sex"]))
    np.testing.assert_allclose(adjustment.coefficients["mk"], reference["lm"]["coef"], rtol=1e-9)
    assert adjustment.sd["mk"] == pytest.approx(reference["lm"]["sigma"], rel=1e-9)


def test_separated_groups_are_told_and_the_penalised_fit_stays_finite():
    """Groups that one marker separates: maximum likelihood has no finite fit (R's glm warns "fitted probabilities
    numerically 0 or 1"); this is said, and the L2 fit gives finite coefficients and probabilities inside (0, 1)."""
    rows = cohort_rows(seed=9)
    for row in rows:
        row["ms"] = row["ms"] + (1.0 if row["group"] == "ALS" else 0.0)
    cohort = stats.read_cohort(rows, markers=["mk", "ms"])
    assert stats.combine(cohort, ["mk", "ms"], cv_repeats=1)["separated"]
    penalised = stats.combine(cohort, ["mk", "ms"], penalty="l2", cv_repeats=1)
    assert not penalised["separated"] and penalised["roc"].auc == 1.0
    model = stats.diagnostic_model(cohort, ["mk", "ms"], penalty="l2")
    assert model["penalty"] == "l2" and not model["separated"] and max(map(abs, model["coefficients"])) < 10
    with pytest.raises(InputError, match="penalty must be one of none, l2"):
        stats.combine(cohort, ["mk", "ms"], penalty="lasso")


def test_roc_and_classify_commands(tmp_path, capsys):
    from ALSQuantLib import __version__, cli, io, provenance

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
    # each curve's confidence band, combinations' too: inside [0, 1], low below high, at 21 specificities
    bands = io.read_table(out / "roc_bands.csv")
    assert {row["marker"] for row in bands} == {"mk", "ms", "fa", "mk+ms"} and len(bands) == 4 * 21
    assert all(0 <= float(r["sensitivity_low"]) <= float(r["sensitivity_high"]) <= 1 for r in bands)
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and "mk+ms" in page and "For research use only" in page
    assert "The reference study, for comparison" in page and "AUC 0.91, sensitivity 83 %" in page
    assert "maximum likelihood, as R" in page and results["penalty"] == "none"
    # every computed figure reaches the tables: both ends of each interval, every DeLong p
    marker_row = io.read_table(out / "roc_markers.csv")[0]
    combination_row = io.read_table(out / "roc_combinations.csv")[0]
    for key in ("sensitivity_ci", "specificity_ci", "bootstrap_ci"):
        assert float(marker_row[f"{key}_low"]) <= float(marker_row[f"{key}_high"])
    assert {"delong_p_vs_mk", "delong_p_vs_ms", "sensitivity_ci_low", "specificity_ci_high"} <= set(combination_row)
    for column in ("delong_p_vs_ms", "sensitivity_ci_low", "bootstrap_ci_high"):
        assert f"<th>{column}</th>" in page
    # p-values as papers print them, plain names, the direction in words, the run's inputs and version
    assert "<td>&lt;0.001</td>" in page and "e-0" not in page.split("<h2>Group comparison</h2>")[1].split("</table>")[0]
    assert "lower in ALS" in page and "higher in ALS" in page
    assert results["run"]["cohort_sha256"] == provenance.file_sha256(tmp_path / "cohort.csv")
    assert results["run"]["alsquant"] == __version__ and results["run"]["penalty"] == "none"
    io.write_table(
        tmp_path / "new.csv",
        [{"participant_id": "new-1", "mk": 1.00, "ms": 0.32}, {"participant_id": "new-2", "mk": 1.11, "ms": 0.09}],
    )
    assert cli.main(["classify", "--model", str(tmp_path / "model.json"), str(tmp_path / "new.csv")]) == 0
    diagnosis = io.read_table(tmp_path / "new_diagnosis.csv")
    assert [d["decision"] for d in diagnosis] == ["ALS", "control"]
    assert [d["participant_id"] for d in diagnosis] == ["new-1", "new-2"]
    assert "For research use only" in capsys.readouterr().out
    io.write_table(tmp_path / "unnamed.csv", [{"mk": 1.00, "ms": 0.32}])
    assert cli.main(["classify", "--model", str(tmp_path / "model.json"), str(tmp_path / "unnamed.csv")]) == 2
    assert "no subject column 'participant_id'; columns are mk, ms" in capsys.readouterr().err
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


def _aging_cohort(seed, n, disease_effect):
    """Controls aged 50 ± 10 and ALS 62 ± 8 years; MK falls 0.004 a year from 1.10 (SD 0.02 about that line),
    women 0.01 higher, and ALS lowers it by `disease_effect`: the truth an age adjustment must recover."""
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(2 * n):
        als = k < n
        age = rng.normal(62 if als else 50, 8 if als else 10)
        sex = "F" if rng.random() < 0.5 else "M"
        mk = 1.10 - 0.004 * (age - 50) + (0.01 if sex == "F" else 0.0) + rng.normal(0, 0.02)
        rows.append(
            {
                "participant_id": f"sub-{k:03d}",
                "group": "ALS" if als else "control",
                "age": age,
                "sex": sex,
                "mk": mk - (disease_effect if als else 0.0),
            }
        )
    return rows


@pytest.mark.parametrize("disease_effect, true_auc", [(0.0, 0.5), (0.03, float(sps.norm.cdf(0.03 / (0.02 * 2**0.5))))])
def test_age_adjustment_recovers_the_disease_effect_from_an_older_patient_group(disease_effect, true_auc):
    """With 1000 a group, the adjusted AUC (ALS lower) is the disease effect's own, Φ(δ / (σ√2)) for two normal
    groups of SD σ (0.5 without effect, 0.856 with δ = 0.03, σ = 0.02; its standard error here about 0.013), while
    the raw AUC takes the age difference for disease; the fitted slope and sex step are the simulated ones."""
    cohort = stats.read_cohort(_aging_cohort(12, 1000, disease_effect), markers=["mk"], covariates=["age", "sex"])
    adjustment = stats.fit_adjustment(cohort)
    intercept, age_slope, male_step = adjustment.coefficients["mk"]
    assert adjustment.levels == {"sex": "M"}
    assert age_slope == pytest.approx(-0.004, abs=0.0003) and male_step == pytest.approx(-0.01, abs=0.004)
    assert adjustment.sd["mk"] == pytest.approx(0.02, rel=0.1)
    raw = stats.roc_analysis(cohort.markers["mk"], cohort.positive, direction=">").auc
    z = stats.adjusted(cohort, adjustment).markers["mk"]
    adjusted = stats.roc_analysis(z, cohort.positive, direction=">").auc
    print(f"effect {disease_effect}: raw AUC {raw:.3f}, adjusted {adjusted:.3f}, true {true_auc:.3f}")
    assert adjusted == pytest.approx(true_auc, abs=0.04)
    # The raw AUC takes the age difference for disease: the groups differ by 0.004 x 12 years + δ, with variances
    # 0.02² + (0.004 x SD of age)² + 0.01² / 4 (sex): Φ(0.078 / 0.0589) = 0.907 with the effect, 0.793 without.
    spread = (2 * 0.02**2 + 0.004**2 * (10**2 + 8**2) + 2 * 0.01**2 / 4) ** 0.5
    assert raw == pytest.approx(sps.norm.cdf((0.004 * 12 + disease_effect) / spread), abs=0.04)


def test_age_adjustment_reaches_the_report_and_the_model(tmp_path, capsys):
    from ALSQuantLib import cli, io

    io.write_table(tmp_path / "cohort.csv", _aging_cohort(13, 30, 0.03))
    out, model_path = tmp_path / "roc", tmp_path / "model.json"
    args = ["roc", str(tmp_path / "cohort.csv"), "--markers", "mk", "--covariates", "age", "sex"]
    assert cli.main([*args, "--save-model", str(model_path), "--out", str(out)]) == 0
    results = io.read_json(out / "results.json")
    adjusted = results["adjusted"]
    assert (
        adjusted["covariates"] == ["age", "sex"] and adjusted["markers"]["mk"]["auc"] < results["markers"]["mk"]["auc"]
    )
    assert "adjusted for age, sex" in (out / "report.html").read_text()
    model = stats.load_model(model_path)
    assert model["adjustment"]["covariates"] == ["age", "sex"]
    # a man whose MK is what the controls' fit predicts for his age: adjusted z = 0, not ALS-like; 0.06 lower, ALS
    intercept, slope, male = model["adjustment"]["coefficients"]["mk"]
    typical = intercept + slope * 70 + male
    typical_subject = stats.classify(model, {"mk": typical, "age": 70, "sex": "M"})
    assert typical_subject["z_scores"]["mk"] == pytest.approx(0, abs=1e-9) and typical_subject["decision"] == "control"
    assert stats.classify(model, {"mk": typical - 0.06, "age": 70, "sex": "M"})["decision"] == "ALS"
    old = stats.classify(model, {"mk": intercept + slope * 95 + male, "age": 95, "sex": "M"})
    assert old["out_of_range"] == ["age"]  # older than any control: extrapolated
    with pytest.raises(InputError, match="no value for covariate.*age"):
        stats.classify(model, {"mk": typical})
    with pytest.raises(InputError, match="covariate 'sex' must be numeric or take two values"):
        rows = _aging_cohort(13, 30, 0.03)
        rows[0]["sex"] = "X"
        stats.fit_adjustment(stats.read_cohort(rows, markers=["mk"], covariates=["sex"]))
