"""Group statistics, ROC analysis and individual diagnosis.

Conventions follow R's pROC so results can be checked against it:

* ``direction="<"``: controls have lower values than cases, a subject is called positive when its value exceeds the
  threshold; ``">"`` the reverse. By default the direction comes from the groups' medians.
* ROC thresholds are the midpoints between consecutive distinct values (plus ±∞).
* AUC variance and its 95 % CI by DeLong's method, computed with the fast midrank algorithm of Sun & Xu (2014);
  the CI is AUC ± z₀.₉₇₅ √var, clipped to [0, 1] (pROC's ``ci.auc(method="delong")``).
* The Youden-optimal cut-off maximises sensitivity + specificity (pROC's ``coords(best.method="youden")``).

and R's ``stats``: the Mann–Whitney test is ``wilcox.test``'s (exact below 50 a group without ties, else the normal
approximation with continuity and tie corrections), and markers are combined by unpenalised logistic regression, the
maximum-likelihood fit of ``glm(family = binomial)`` (an L2-penalised fit, `PENALTIES`, as an option).

References
----------
DeLong ER, DeLong DM, Clarke-Pearson DL. Comparing the areas under two or more correlated receiver operating
characteristic curves: a nonparametric approach. Biometrics 1988;44:837-45.
Sun X, Xu W. Fast implementation of DeLong's algorithm for comparing the areas under correlated receiver operating
characteristic curves. IEEE Signal Process Lett 2014;21:1389-93.
Robin X et al. pROC: an open-source package for R and S+ to analyze and compare ROC curves. BMC Bioinformatics
2011;12:77.
Wilson EB. Probable inference, the law of succession, and statistical inference. JASA 1927;22:209-12.
Holm S. A simple sequentially rejective multiple test procedure. Scand J Stat 1979;6:65-70.
"""

import dataclasses
import logging
import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy import special
from scipy import stats as sps

from . import __version__, io
from .errors import InputError

log = logging.getLogger(__name__)

MIN_PER_GROUP = 3


# ----------------------------------------------------------------------------------------------------------------
# Cohort table
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Cohort:
    """Subjects, their group (True = positive, e.g. ALS) and marker values."""

    subjects: list
    positive: np.ndarray
    markers: dict
    positive_label: str
    negative_label: str
    excluded: dict = field(default_factory=dict)
    """Reason (``failed_qc``, ``other_group``) → the subjects `read_cohort` left out."""
    covariates: dict = field(default_factory=dict)
    """Covariate name → values (numbers, or two categories as strings), for `fit_adjustment`."""
    table: list = field(default_factory=list)
    """The kept subjects' rows as read (every column), for `table_one`."""

    @property
    def n_positive(self):
        return int(self.positive.sum())

    @property
    def n_negative(self):
        return int((~self.positive).sum())


SUBJECT_COLUMN = "participant_id"
"""The subject column everywhere (BIDS's name, as ``run-cohort`` writes ``cohort.csv``)."""

QC_COLUMN = "qc_passed"
"""The column ``run-cohort`` writes the quality check's verdict in (`read_cohort` leaves failed subjects out)."""


def _false(value):
    return str(value).strip().lower() in ("false", "0", "no", "failed")


def read_cohort(
    table,
    *,
    markers,
    group_column="group",
    positive="ALS",
    subject_column=SUBJECT_COLUMN,
    groups=None,
    exclude_failed_qc=True,
    covariates=(),
):
    """Validate a cohort table.

    Parameters
    ----------
    table : path (CSV/TSV), list of dict, or pandas.DataFrame
    markers : sequence of str
        Marker columns.
    group_column, positive, subject_column : str
        The positive group's label (e.g. ``"ALS"``); every other label kept must be one single negative group.
    groups : sequence of str, optional
        The groups to compare (e.g. ``["ALS", "control"]`` from an ALS/PLS/control cohort); subjects of other
        groups are left out.
    exclude_failed_qc : bool
        Leave out subjects whose `QC_COLUMN` (when the table has one) says the quality check failed.
    covariates : sequence of str
        Columns to adjust the markers for (`fit_adjustment`), e.g. ``["age", "sex"]``: numbers, or two categories.

    Returns
    -------
    Cohort
        With ``excluded``: reason → the subjects left out (``failed_qc``, ``other_group``).
    """
    if hasattr(table, "to_dict"):
        rows = table.to_dict("records")
    elif isinstance(table, (list, tuple)):
        rows = list(table)
    else:
        rows = io.read_table(table)
    if not rows:
        raise InputError("cohort table: it has no rows")
    columns = set(rows[0])
    for column in [subject_column, group_column, *markers, *covariates]:
        if column not in columns:
            raise InputError(f"cohort table: no column {column!r}; columns are {', '.join(sorted(map(str, columns)))}")
    subjects = [str(r[subject_column]) for r in rows]
    groups_read = [str(r.get(group_column) or "").strip() for r in rows]
    missing = [s for s, g in zip(subjects, groups_read) if not g or g.lower() == "nan"]
    if missing:
        raise InputError(f"cohort table: no {group_column} for subject(s) {', '.join(missing)}")
    if groups is not None:
        unknown = sorted(set(groups) - set(groups_read))
        if unknown or positive not in groups:
            raise InputError(
                f"cohort table: groups {', '.join(groups)} asked for, with the positive group {positive!r} among "
                f"them; the table has {', '.join(sorted(set(groups_read)))}"
            )
    excluded = {"failed_qc": [], "other_group": []}
    kept = []
    for subject, group, row in zip(subjects, groups_read, rows):
        if groups is not None and group not in groups:
            excluded["other_group"].append(subject)
        elif exclude_failed_qc and QC_COLUMN in row and _false(row[QC_COLUMN]):
            excluded["failed_qc"].append(subject)
        else:
            kept.append((subject, group, row))
    if not kept:
        raise InputError(f"cohort table: no subject left ({_excluded_text(excluded)})")
    subjects, groups_read, rows = (list(column) for column in zip(*kept))
    labels = sorted(set(groups_read))
    if positive not in labels:
        raise InputError(f"cohort table: no subject in the positive group {positive!r}; groups are {', '.join(labels)}")
    negatives = [g for g in labels if g != positive]
    if len(negatives) != 1:
        raise InputError(
            f"cohort table: expected {positive!r} and one other group, found {', '.join(labels) or 'none'}; "
            "choose two with --groups"
        )
    is_positive = np.array([g == positive for g in groups_read])
    for label, count in ((positive, is_positive.sum()), (negatives[0], (~is_positive).sum())):
        if count < MIN_PER_GROUP:
            raise InputError(
                f"cohort table: group {label!r} has {count} subject(s); at least {MIN_PER_GROUP} are needed"
            )
    values = {}
    for marker in markers:
        column, bad = [], []
        for subject, row in zip(subjects, rows):
            try:
                value = float(row[marker])
            except (TypeError, ValueError):
                value = np.nan
            if not np.isfinite(value):
                bad.append(subject)
            column.append(value)
        if bad:
            raise InputError(
                f"cohort table: marker {marker!r} is missing or not numeric for subject(s) {', '.join(bad)}"
            )
        values[marker] = np.array(column)
    covariate_values = {}
    for name in covariates:
        column = [row[name] for row in rows]
        missing = [s for s, v in zip(subjects, column) if v is None or str(v).strip().lower() in ("", "nan", "n/a")]
        if missing:
            raise InputError(f"cohort table: covariate {name!r} is missing for subject(s) {', '.join(missing)}")
        covariate_values[name] = _coded(name, column)[0]
    left_out = {k: v for k, v in excluded.items() if v}
    return Cohort(subjects, is_positive, values, positive, negatives[0], left_out, covariate_values, rows)


def _excluded_text(excluded):
    reasons = {"failed_qc": "whose quality check failed", "other_group": "of other groups"}
    return "; ".join(f"{len(ids)} {reasons[k]}: {', '.join(ids)}" for k, ids in excluded.items() if ids) or "none"


def excluded_text(cohort):
    """The subjects `read_cohort` left out, in words ("2 whose quality check failed: sub-03, sub-07"), or None."""
    return _excluded_text(cohort.excluded) if cohort.excluded else None


# ----------------------------------------------------------------------------------------------------------------
# ROC
# ----------------------------------------------------------------------------------------------------------------
def _midranks(x):
    """Midranks (1-based; ties get their average rank), as in Sun & Xu's algorithm."""
    return sps.rankdata(x, method="average")


def delong(scores, positive):
    """AUCs and their DeLong covariance for one or more scores of the same subjects.

    Parameters
    ----------
    scores : ndarray, shape (k, n) or (n,)
        Oriented so that larger means more likely positive.
    positive : ndarray of bool, shape (n,)

    Returns
    -------
    aucs : ndarray, shape (k,)
    covariance : ndarray, shape (k, k)

    Notes
    -----
    Sun & Xu (2014): with m positives X and n negatives Y, midranks T_Z over X ∪ Y, T_X within X and T_Y within Y,
    AUC = (Σ T_Z[X] − m(m+1)/2) / (mn), V10 = (T_Z[X] − T_X)/n, V01 = 1 − (T_Z[Y] − T_Y)/m, and
    Cov = S10/m + S01/n with S10, S01 the sample covariances of V10 and V01 across scores.
    """
    scores = np.atleast_2d(np.asarray(scores, dtype=float))
    positive = np.asarray(positive, dtype=bool)
    x, y = scores[:, positive], scores[:, ~positive]
    m, n = x.shape[1], y.shape[1]
    tz = np.apply_along_axis(_midranks, 1, np.hstack([x, y]))
    tx = np.apply_along_axis(_midranks, 1, x)
    ty = np.apply_along_axis(_midranks, 1, y)
    aucs = (tz[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n)
    v10 = (tz[:, :m] - tx) / n
    v01 = 1.0 - (tz[:, m:] - ty) / m
    s10 = np.atleast_2d(np.cov(v10))
    s01 = np.atleast_2d(np.cov(v01))
    return aucs, s10 / m + s01 / n


def orient(values, positive, direction=None):
    """Scores oriented so that larger means positive, and the direction used (pROC's ``"<"`` or ``">"``).

    Without a direction, it is ``"<"`` when the positive group's median exceeds the negative group's (pROC's
    ``direction="auto"``), else ``">"``.
    """
    values = np.asarray(values, dtype=float)
    if direction is None:
        direction = "<" if np.median(values[positive]) > np.median(values[~positive]) else ">"
    if direction not in ("<", ">"):
        raise InputError(f"direction {direction!r}: expected '<' (controls lower) or '>' (controls higher)")
    return (values if direction == "<" else -values), direction


def roc_curve(values, positive, direction):
    """Thresholds (pROC's midpoints, ±∞), sensitivities and specificities."""
    values = np.asarray(values, dtype=float)
    distinct = np.unique(values)
    thresholds = np.concatenate([[-np.inf], (distinct[:-1] + distinct[1:]) / 2, [np.inf]])
    if direction == ">":
        thresholds = thresholds[::-1]
    called = values[None, :] > thresholds[:, None] if direction == "<" else values[None, :] < thresholds[:, None]
    sensitivity = called[:, positive].mean(axis=1)
    specificity = (~called[:, ~positive]).mean(axis=1)
    return thresholds, sensitivity, specificity


def wilson_interval(successes, total, level=0.95):
    """Wilson score interval of a proportion."""
    result = sps.binomtest(int(successes), int(total)).proportion_ci(confidence_level=level, method="wilson")
    return float(result.low), float(result.high)


@dataclass
class MarkerROC:
    """ROC analysis of one marker (or combined score)."""

    name: str
    auc: float
    ci_low: float
    ci_high: float
    direction: str
    threshold: float
    sensitivity: float
    specificity: float
    sensitivity_ci: tuple
    specificity_ci: tuple
    curve: dict = field(repr=False, default_factory=dict)
    bootstrap_ci: tuple = None
    band: dict = field(repr=False, default=None)
    """The curve's confidence band (`sensitivity_band`), when computed."""

    def summary(self):
        return {
            "auc": self.auc,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "direction": self.direction,
            "threshold": self.threshold,
            "sensitivity": self.sensitivity,
            "specificity": self.specificity,
            "sensitivity_ci": list(self.sensitivity_ci),
            "specificity_ci": list(self.specificity_ci),
            **({"bootstrap_ci": list(self.bootstrap_ci)} if self.bootstrap_ci else {}),
        }


def auc_text(result, digits=2):
    """An AUC with its 95 % CI, as every output writes it; for a combination (`combine`'s result), the apparent
    AUC with its CI and the cross-validated AUC.

    >>> auc_text({"auc": 0.931, "ci_low": 0.853, "ci_high": 1.0})
    'AUC 0.93 [0.85-1.00]'
    >>> auc_text({"auc_apparent": 0.998, "ci_low": 0.99, "ci_high": 1.0, "auc_cv": 0.987}, digits=3)
    'apparent AUC 0.998 [0.990-1.000], cross-validated 0.987'
    """
    interval = f"[{result['ci_low']:.{digits}f}-{result['ci_high']:.{digits}f}]"
    if "auc_apparent" in result:
        apparent, cross_validated = f"{result['auc_apparent']:.{digits}f}", f"{result['auc_cv']:.{digits}f}"
        return f"apparent AUC {apparent} {interval}, cross-validated {cross_validated}"
    return f"AUC {result['auc']:.{digits}f} {interval}"


def roc_analysis(values, positive, *, name="marker", direction=None, level=0.95, bootstrap=0, random_seed=0):
    """AUC with DeLong CI, Youden cut-off with Wilson CIs, optionally a stratified bootstrap CI of the AUC."""
    positive = np.asarray(positive, dtype=bool)
    oriented, direction = orient(values, positive, direction)
    aucs, covariance = delong(oriented, positive)
    auc, se = float(aucs[0]), float(np.sqrt(max(covariance[0, 0], 0.0)))
    z = sps.norm.ppf(0.5 + level / 2)
    thresholds, sens, spec = roc_curve(values, positive, direction)
    best = int(np.argmax(sens + spec))
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    result = MarkerROC(
        name,
        auc,
        float(max(0.0, auc - z * se)),
        float(min(1.0, auc + z * se)),
        direction,
        float(thresholds[best]),
        float(sens[best]),
        float(spec[best]),
        wilson_interval(round(sens[best] * n_pos), n_pos, level),
        wilson_interval(round(spec[best] * n_neg), n_neg, level),
        curve={"threshold": thresholds, "sensitivity": sens, "specificity": spec},
    )
    if bootstrap:
        result.bootstrap_ci = bootstrap_auc_ci(oriented, positive, bootstrap, random_seed, level)
    return result


def bootstrap_auc_ci(oriented, positive, n_resamples, random_seed, level=0.95):
    """Stratified bootstrap percentile CI of the AUC (cases and controls resampled separately, as pROC does)."""
    rng = np.random.default_rng(random_seed)
    cases, controls = oriented[positive], oriented[~positive]
    aucs = np.empty(n_resamples)
    for b in range(n_resamples):
        x = rng.choice(cases, cases.size)
        y = rng.choice(controls, controls.size)
        greater = (x[:, None] > y[None, :]).mean() + 0.5 * (x[:, None] == y[None, :]).mean()
        aucs[b] = greater
    tail = (1 - level) / 2 * 100
    return float(np.percentile(aucs, tail)), float(np.percentile(aucs, 100 - tail))


BAND_SPECIFICITIES = np.arange(21) / 20
"""Specificities at which `sensitivity_band` gives the sensitivity's CI (0, 0.05, ..., 1)."""
BAND_RESAMPLES = 2000


def sensitivity_at(sensitivity, specificity, at):
    """Sensitivity at the specificities `at` along a ROC curve (`roc_curve`'s points, specificity rising), as
    pROC's ``coords(input = "specificity")``: the highest sensitivity where the curve reaches a specificity, linear
    between its points elsewhere."""
    sensitivity, specificity, at = (np.asarray(a, dtype=float) for a in (sensitivity, specificity, at))
    after = np.clip(np.searchsorted(specificity, at, side="right"), 1, specificity.size - 1)
    before = after - 1
    span = specificity[after] - specificity[before]
    share = np.divide(at - specificity[before], span, out=np.zeros_like(at), where=span > 0)
    between = sensitivity[before] + share * (sensitivity[after] - sensitivity[before])
    reached = np.abs(specificity[None, :] - at[:, None]) <= 1e-12
    highest = np.where(reached, sensitivity[None, :], -np.inf).max(axis=1)
    return np.where(reached.any(axis=1), highest, between)


def sensitivity_band(values, positive, direction, *, n_resamples=BAND_RESAMPLES, random_seed=0, level=0.95):
    """Confidence band of a ROC curve: at each of `BAND_SPECIFICITIES`, the stratified bootstrap percentile interval
    of the sensitivity (cases and controls resampled separately, the direction kept), as pROC's ``ci.se``.

    Returns
    -------
    dict
        ``specificity``, ``low``, ``high`` (arrays).
    """
    values, positive = np.asarray(values, dtype=float), np.asarray(positive, dtype=bool)
    rng = np.random.default_rng(random_seed)
    cases, controls = values[positive], values[~positive]
    labels = np.r_[np.ones(cases.size, bool), np.zeros(controls.size, bool)]
    sensitivities = np.empty((n_resamples, BAND_SPECIFICITIES.size))
    for b in range(n_resamples):
        resample = np.r_[rng.choice(cases, cases.size), rng.choice(controls, controls.size)]
        _, sens, spec = roc_curve(resample, labels, direction)
        sensitivities[b] = sensitivity_at(sens, spec, BAND_SPECIFICITIES)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(sensitivities, [tail, 100 - tail], axis=0)
    return {"specificity": BAND_SPECIFICITIES, "low": low, "high": high}


def delong_test(scores_a, scores_b, positive):
    """Paired DeLong test of two correlated AUCs (pROC's ``roc.test(method="delong")``): z and two-sided p."""
    aucs, cov = delong(np.vstack([scores_a, scores_b]), positive)
    variance = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    if variance <= 0:
        return 0.0, 1.0
    z = (aucs[0] - aucs[1]) / np.sqrt(variance)
    return float(z), float(2 * sps.norm.sf(abs(z)))


# ----------------------------------------------------------------------------------------------------------------
# Group comparison
# ----------------------------------------------------------------------------------------------------------------
def holm(p_values):
    """Holm's step-down adjusted p-values."""
    p = np.asarray(p_values, dtype=float)
    order = np.argsort(p)
    adjusted = np.empty_like(p)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, (len(p) - rank) * p[index])
        adjusted[index] = min(1.0, running)
    return adjusted


def mann_whitney(cases, controls):
    """The Mann–Whitney test as R's ``wilcox.test(cases, controls)`` computes it: U (R's W, the cases' rank sum minus
    n(n + 1)/2), the two-sided p-value, and how it was found: exactly when both groups hold fewer than 50 values and
    no value repeats (R's rule), else by the normal approximation with continuity and tie corrections."""
    values = np.concatenate([cases, controls])
    exact = cases.size < 50 and controls.size < 50 and np.unique(values).size == values.size
    test = sps.mannwhitneyu(
        cases, controls, alternative="two-sided", method="exact" if exact else "asymptotic", use_continuity=True
    )
    return float(test.statistic), float(test.pvalue), "exact" if exact else "normal approximation"


def group_comparison(cohort):
    """Per marker: n, median [min–max] per group, Mann–Whitney U two-sided p (`mann_whitney`), Cliff's delta,
    Holm-adjusted p."""
    rows = []
    for marker, values in cohort.markers.items():
        cases, controls = values[cohort.positive], values[~cohort.positive]
        u, p, method = mann_whitney(cases, controls)
        delta = 2 * u / (cases.size * controls.size) - 1  # Cliff's delta = rank-biserial r
        row = {
            "marker": marker,
            "mannwhitney_u": u,
            "mannwhitney_p": p,
            "mannwhitney_method": method,
            "cliffs_delta": float(delta),
        }
        for label, group in ((cohort.positive_label, cases), (cohort.negative_label, controls)):
            row.update(
                {
                    f"{label}_n": int(group.size),
                    f"{label}_median": float(np.median(group)),
                    f"{label}_min": float(group.min()),
                    f"{label}_max": float(group.max()),
                }
            )
        rows.append(row)
    for row, adjusted in zip(rows, holm([r["mannwhitney_p"] for r in rows])):
        row["holm_p"] = float(adjusted)
    return rows


DEMOGRAPHICS = ("age", "sex", "gender", "handedness", "onset", "disease_duration", "alsfrs", "fvc", "edss")
"""Columns `table_one` describes: those whose lower-case name starts with one of these (``age``, ``sex``,
``disease_duration_months``, ``alsfrs_r``, ``onset`` (bulbar/spinal), ...), in the table's order."""


def _blank(value):
    return value is None or str(value).strip().lower() in ("", "nan", "n/a", "na")


def table_one(cohort):
    """The cohort's "Table 1": per demographic column it has (`DEMOGRAPHICS`), per group the subjects with a value
    and, for numbers, median [interquartile range] with the Mann–Whitney p (`mann_whitney`), for categories n (%)
    per level with Fisher's exact p (two levels) or the χ² test's (more). A group without values (ALSFRS-R in
    controls) shows none, and no p."""
    if not cohort.table:
        return []
    groups = ((cohort.positive_label, cohort.positive), (cohort.negative_label, ~cohort.positive))
    columns = [c for c in cohort.table[0] if str(c).lower().startswith(DEMOGRAPHICS)]
    rows = []
    for column in columns:
        raw = np.array([None if _blank(r[column]) else str(r[column]).strip() for r in cohort.table], dtype=object)
        present = np.array([v is not None for v in raw])
        try:
            numbers = np.array([float(v) if v is not None else np.nan for v in raw])
        except ValueError:
            numbers = None
        if numbers is not None:
            row, samples = {"characteristic": f"{column}, median [IQR]"}, []
            for label, members in groups:
                values = numbers[members & present]
                samples.append(values)
                q1, median, q3 = np.percentile(values, [25, 50, 75]) if values.size else (np.nan,) * 3
                row[label] = f"{median:.4g} [{q1:.4g}-{q3:.4g}] (n = {values.size})" if values.size else "-"
            row["p"] = mann_whitney(*samples)[1] if all(len(v) >= 2 for v in samples) else None
            row["test"] = "Mann-Whitney" if row["p"] is not None else ""
            rows.append(row)
            continue
        levels = sorted({v for v in raw if v is not None})
        counts = np.array([[np.sum((raw == level) & members) for level in levels] for _, members in groups])
        row = {"characteristic": f"{column}, n (%)"}
        for (label, _), line in zip(groups, counts):
            total = line.sum()
            row[label] = "; ".join(f"{lv} {n} ({100 * n / total:.0f} %)" for lv, n in zip(levels, line)) or "-"
        row["p"], row["test"] = None, ""
        if counts.sum(axis=1).all() and len(levels) >= 2:
            if len(levels) == 2:
                row["p"], row["test"] = float(sps.fisher_exact(counts)[1]), "Fisher's exact"
            else:
                row["p"], row["test"] = float(sps.chi2_contingency(counts)[1]), "chi-squared"
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Combined markers and the diagnostic model
# ----------------------------------------------------------------------------------------------------------------
PENALTIES = ("none", "l2")
"""How markers are combined: ``none``, the maximum-likelihood logistic regression (R's ``glm``, what clinical papers
report; the default); ``l2``, L2-penalised with C = 1 on standardised markers (shrinks the coefficients, and stays
finite when the groups are separated)."""

SEPARATION_EPS = 10 * np.finfo(float).eps
"""A fitted probability within this of 0 or 1 means the groups are (quasi-)separated and maximum likelihood has no
finite solution: R's ``glm`` warns "fitted probabilities numerically 0 or 1 occurred" at the same bound."""


def _fit_logistic(X, y, penalty="none"):
    """Logistic regression on standardised markers (which leaves the unpenalised fit's scores unchanged): (scaler,
    model, whether the fitted probabilities reach 0 or 1, `SEPARATION_EPS`)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    if penalty not in PENALTIES:
        raise InputError(f"logistic regression: penalty must be one of {', '.join(PENALTIES)}, got {penalty!r}")
    scaler = StandardScaler().fit(X)
    # Newton's method, as glm's IRLS, to a tolerance far below what any figure shows
    model = LogisticRegression(
        C=np.inf if penalty == "none" else 1.0, solver="newton-cholesky", tol=1e-12, max_iter=100
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # separation: told below, as glm does
        model.fit(scaler.transform(X), y)
    probability = model.predict_proba(scaler.transform(X))[:, 1]
    separated = bool(np.any((probability < SEPARATION_EPS) | (probability > 1 - SEPARATION_EPS)))
    return scaler, model, separated


def raw_coefficients(scaler, model):
    """The logistic model on the markers' own scale: (intercept, coefficients), as ``coef(glm(...))`` gives them."""
    coefficients = model.coef_[0] / scaler.scale_
    return float(model.intercept_[0] - coefficients @ scaler.mean_), coefficients


def combine(cohort, markers, *, penalty="none", cv_splits=5, cv_repeats=20, random_seed=0):
    """Logistic regression on the markers (`PENALTIES`; default maximum likelihood, as R's ``glm``): apparent AUC
    with DeLong CI, cross-validated AUC (repeated stratified k-fold, the mean over repeats of the AUC of pooled
    out-of-fold scores), and DeLong tests of the combined score against each single marker.

    Returns
    -------
    dict with ``scores`` (apparent), ``roc`` (MarkerROC), ``auc_cv``, ``auc_cv_sd``, ``delong_p_vs``, ``model``
    (scaler, fitted model), ``separated`` (the groups separated: no finite maximum-likelihood fit).
    """
    from sklearn.model_selection import RepeatedStratifiedKFold

    X = np.column_stack([cohort.markers[m] for m in markers])
    y = cohort.positive.astype(int)
    scaler, model, separated = _fit_logistic(X, y, penalty)
    if separated:
        log.warning(
            "%s: the groups are separated, fitted probabilities reach 0 or 1 and the maximum-likelihood fit has no "
            "finite solution; its AUC is 1 on these subjects only (see the cross-validated AUC, or --penalty l2)",
            "+".join(markers),
        )
    scores = model.decision_function(scaler.transform(X))
    roc = roc_analysis(scores, cohort.positive, name="+".join(markers), direction="<")
    folds = min(cv_splits, cohort.n_positive, cohort.n_negative)
    splitter = RepeatedStratifiedKFold(n_splits=folds, n_repeats=cv_repeats, random_state=random_seed)
    out_of_fold = np.zeros((cv_repeats, len(y)))
    for k, (train, test) in enumerate(splitter.split(X, y)):
        s, m, _ = _fit_logistic(X[train], y[train], penalty)
        out_of_fold[k // folds, test] = m.decision_function(s.transform(X[test]))
    cv_aucs = [float(delong(row, cohort.positive)[0][0]) for row in out_of_fold]
    delong_p = {}
    for marker in markers:
        single, _ = orient(cohort.markers[marker], cohort.positive)
        delong_p[marker] = delong_test(scores, single, cohort.positive)[1]
    return {
        "scores": scores,
        "roc": roc,
        "auc_cv": float(np.mean(cv_aucs)),
        "auc_cv_sd": float(np.std(cv_aucs)),
        "delong_p_vs": delong_p,
        "model": (scaler, model),
        "separated": separated,
    }


def diagnostic_model(cohort, markers, *, penalty="none", adjust=False):
    """A fitted diagnostic model as a JSON-ready dict (never pickle).

    It holds the markers, the penalty (`PENALTIES`), the scaler (mean, scale), the logistic coefficients and
    intercept (on the standardised markers), whether the groups were separated, with `adjust`, the `Adjustment`
    for the cohort's covariates (the model then works on adjusted z-scores, and classifying needs the covariates),
    the Youden cut-off on
    the probability scale, the training summary (group sizes, apparent AUC, marker ranges, control mean and SD per
    marker for z-scores) and the software versions.
    """
    from importlib import metadata

    if isinstance(markers, str) or not all(m in cohort.markers for m in markers):
        raise InputError(f"diagnostic model: markers must be a list of the cohort's markers, got {markers!r}")
    adjustment = fit_adjustment(cohort) if adjust else None
    cohort = adjusted(cohort, adjustment) if adjust else cohort
    controls = ~cohort.positive
    constant = [m for m in markers if np.ptp(cohort.markers[m][controls]) == 0]
    if constant:
        raise InputError(
            f"diagnostic model: marker(s) {', '.join(constant)} take one value in every "
            f"{cohort.negative_label} subject; a model needs markers that vary"
        )
    X = np.column_stack([cohort.markers[m] for m in markers])
    scaler, model, separated = _fit_logistic(X, cohort.positive.astype(int), penalty)
    intercept, coefficients = raw_coefficients(scaler, model)
    probability = model.predict_proba(scaler.transform(X))[:, 1]
    roc = roc_analysis(probability, cohort.positive, direction="<")
    return {
        "format": MODEL_FORMAT,
        "markers": list(markers),
        "penalty": penalty,
        "separated": separated,
        **({"adjustment": adjustment.as_dict()} if adjust else {}),
        "positive": cohort.positive_label,
        "negative": cohort.negative_label,
        "scaler": {"mean": scaler.mean_.tolist(), "scale": scaler.scale_.tolist()},
        "coefficients": model.coef_[0].tolist(),
        "intercept": float(model.intercept_[0]),
        # the same model on the markers' own scale, as R's coef(glm(...)) gives it
        "on_marker_scale": dict(zip(["(Intercept)", *markers], [intercept, *coefficients.tolist()])),
        "cutoff": roc.threshold,
        "training": {
            "n": {cohort.positive_label: cohort.n_positive, cohort.negative_label: cohort.n_negative},
            "auc_apparent": roc.auc,
            "sensitivity": roc.sensitivity,
            "specificity": roc.specificity,
            "range": {m: [float(cohort.markers[m].min()), float(cohort.markers[m].max())] for m in markers},
            "control_mean": {m: float(cohort.markers[m][controls].mean()) for m in markers},
            "control_sd": {m: float(cohort.markers[m][controls].std(ddof=1)) for m in markers},
        },
        "versions": {"alsquant": __version__, "scikit-learn": metadata.version("scikit-learn")},
    }


MODEL_FORMAT = "alsquant-diagnostic-model/1"


def _finite_list(value, length, where, field, *, positive=False):
    if (
        not isinstance(value, list)
        or len(value) != length
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in value)
    ):
        raise InputError(f"{where}: field {field} must be a list of {length} finite numbers, got {value!r}")
    if positive and not all(v > 0 for v in value):
        raise InputError(f"{where}: field {field} must hold positive numbers, got {value!r}")
    return value


def _finite_number(value, where, field, *, low=-np.inf, high=np.inf, positive=False):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not np.isfinite(value):
        raise InputError(f"{where}: field {field} must be a finite number, got {value!r}")
    if not low <= value <= high or (positive and value <= 0):
        bounds = "positive" if positive else f"between {low:g} and {high:g}"
        raise InputError(f"{where}: field {field} must be {bounds}, got {value!r}")
    return value


def validate_model(model, where="model"):
    """Check a diagnostic model completely (types, lengths, finiteness, ranges); `InputError` naming `where` and the
    field otherwise. A model that passes gives a finite probability and a real decision for any finite input."""
    if not isinstance(model, dict) or model.get("format") != MODEL_FORMAT:
        raise InputError(f"{where}: not an ALSQuant diagnostic model (expected format {MODEL_FORMAT!r})")
    needed = ("markers", "positive", "negative", "scaler", "coefficients", "intercept", "cutoff", "training")
    missing = [k for k in needed if k not in model]
    if missing:
        raise InputError(f"{where}: missing field(s) {', '.join(missing)}")
    markers = model["markers"]
    if (
        not isinstance(markers, list)
        or not markers
        or not all(isinstance(m, str) and m for m in markers)
        or len(set(markers)) != len(markers)
    ):
        raise InputError(f"{where}: field markers must be a list of distinct marker names, got {markers!r}")
    for label in ("positive", "negative"):
        if not isinstance(model[label], str) or not model[label]:
            raise InputError(f"{where}: field {label} must be a group label, got {model[label]!r}")
    if model["positive"] == model["negative"]:
        raise InputError(f"{where}: fields positive and negative name the same group {model['positive']!r}")
    n = len(markers)
    scaler = model["scaler"]
    if not isinstance(scaler, dict):
        raise InputError(f"{where}: field scaler must hold mean and scale, got {scaler!r}")
    _finite_list(scaler.get("mean"), n, where, "scaler.mean")
    _finite_list(scaler.get("scale"), n, where, "scaler.scale", positive=True)
    _finite_list(model["coefficients"], n, where, "coefficients")
    _finite_number(model["intercept"], where, "intercept")
    _finite_number(model["cutoff"], where, "cutoff (a probability)", low=0.0, high=1.0)
    training = model["training"]
    if not isinstance(training, dict):
        raise InputError(f"{where}: field training must be an object, got {training!r}")
    for summary in ("range", "control_mean", "control_sd"):
        if not isinstance(training.get(summary), dict) or set(training[summary]) != set(markers):
            raise InputError(f"{where}: field training.{summary} must give a value for each of {', '.join(markers)}")
    for marker in markers:
        low, high = _finite_list(training["range"][marker], 2, where, f"training.range.{marker}")
        if low > high:
            raise InputError(f"{where}: field training.range.{marker} must be [low, high], got {[low, high]}")
        _finite_number(training["control_mean"][marker], where, f"training.control_mean.{marker}")
        _finite_number(training["control_sd"][marker], where, f"training.control_sd.{marker}", positive=True)
    if "adjustment" in model:
        _validate_adjustment(model["adjustment"], markers, where)
    return model


def _validate_adjustment(adjustment, markers, where):
    fields = {"covariates", "levels", "coefficients", "sd", "ranges"}
    if not isinstance(adjustment, dict) or set(adjustment) != fields:
        raise InputError(f"{where}: field adjustment must hold {', '.join(sorted(fields))}")
    covariates = adjustment["covariates"]
    if not isinstance(covariates, list) or not covariates or not all(isinstance(c, str) and c for c in covariates):
        raise InputError(f"{where}: field adjustment.covariates must be a list of column names, got {covariates!r}")
    levels, ranges = adjustment["levels"], adjustment["ranges"]
    if not isinstance(levels, dict) or not set(levels) <= set(covariates) or not all(map(str, levels.values())):
        raise InputError(f"{where}: field adjustment.levels must give the level coded 1 of categorical covariates")
    if not isinstance(ranges, dict) or set(ranges) != set(covariates) - set(levels):
        raise InputError(f"{where}: field adjustment.ranges must give [min, max] of each numeric covariate")
    for name, bounds in ranges.items():
        _finite_list(bounds, 2, where, f"adjustment.ranges.{name}")
    for summary in ("coefficients", "sd"):
        if not isinstance(adjustment[summary], dict) or not set(markers) <= set(adjustment[summary]):
            raise InputError(f"{where}: field adjustment.{summary} must give a value for each of {', '.join(markers)}")
    for marker in markers:
        _finite_list(
            adjustment["coefficients"][marker], 1 + len(covariates), where, f"adjustment.coefficients.{marker}"
        )
        _finite_number(adjustment["sd"][marker], where, f"adjustment.sd.{marker}", positive=True)


def save_model(model, path):
    """Write a diagnostic model as JSON, after `validate_model`: a degenerate model (a constant marker, a cut-off
    that no probability reaches) is refused, never saved."""
    validate_model(io.json_ready(model), "diagnostic model")
    io.write_json(path, model)


def load_model(path):
    """Read and fully check (`validate_model`) a diagnostic model saved by `save_model`."""
    return validate_model(io.read_json(path), f"model {path}")


def classify(model, values):
    """Diagnose one subject.

    Parameters
    ----------
    model : dict (`diagnostic_model` or `load_model`)
    values : dict marker → value
        With an adjusted model (``adjustment``), the covariates' values too (e.g. ``age``, ``sex``).

    Returns
    -------
    dict with ``probability`` (of the positive group), ``decision``, ``z_scores`` against the training controls
    (adjusted for the covariates when the model is), and ``out_of_range`` (markers, or covariates, outside the
    training range: extrapolation, trust less).
    """
    validate_model(model)
    missing = [m for m in model["markers"] if m not in values]
    if missing:
        raise InputError(f"subject: no value for marker(s) {', '.join(missing)}")
    x = np.array([float(values[m]) for m in model["markers"]])
    if not np.all(np.isfinite(x)):
        raise InputError(f"subject: marker values must be finite numbers, got {dict(zip(model['markers'], x))}")
    training, out_of_range = model["training"], []
    if "adjustment" in model:
        adjustment = Adjustment(**model["adjustment"])
        absent = [c for c in adjustment.covariates if values.get(c) in (None, "")]
        if absent:
            raise InputError(f"subject: no value for covariate(s) {', '.join(absent)}, which the model adjusts for")
        covariates = {c: values[c] for c in adjustment.covariates}
        z = adjustment.z_scores(dict(zip(model["markers"], x)), covariates)
        x = np.array([float(z[m][0]) for m in model["markers"]])
        z_scores = dict(zip(model["markers"], x.tolist()))
        out_of_range = [c for c, (low, high) in adjustment.ranges.items() if not low <= float(values[c]) <= high]
    else:
        z_scores = {
            m: (v - training["control_mean"][m]) / training["control_sd"][m] for m, v in zip(model["markers"], x)
        }
    standardised = (x - np.array(model["scaler"]["mean"])) / np.array(model["scaler"]["scale"])
    logit = float(np.dot(model["coefficients"], standardised) + model["intercept"])
    probability = float(special.expit(logit))  # no overflow for a subject far out
    out_of_range = [
        m for m, v in zip(model["markers"], x) if not training["range"][m][0] <= v <= training["range"][m][1]
    ] + out_of_range
    return {
        "probability": probability,
        "decision": model["positive"] if probability > model["cutoff"] else model["negative"],
        "cutoff": model["cutoff"],
        "z_scores": z_scores,
        "out_of_range": out_of_range,
    }


def _analysis(cohort, combinations, penalty, bootstrap, random_seed, cv_repeats):
    """Group comparison, ROC per marker and per combination: (markers, combinations, rocs, comparison)."""
    comparison = group_comparison(cohort)
    by_marker = {row["marker"]: row for row in comparison}
    markers, combined_results, rocs = {}, {}, []
    for marker, values in cohort.markers.items():
        roc = roc_analysis(values, cohort.positive, name=marker, bootstrap=bootstrap, random_seed=random_seed)
        roc.band = sensitivity_band(values, cohort.positive, roc.direction, random_seed=random_seed)
        rocs.append(roc)
        markers[marker] = {
            **roc.summary(),
            **{k: by_marker[marker][k] for k in ("mannwhitney_p", "mannwhitney_method", "holm_p", "cliffs_delta")},
        }
    for combination in combinations:
        parts = combination.split("+")
        unknown = [m for m in parts if m not in cohort.markers]
        if unknown or len(parts) < 2:
            raise InputError(
                f"combination {combination!r}: expected two or more of the markers {', '.join(cohort.markers)} "
                f"joined by '+'"
            )
        combined = combine(cohort, parts, penalty=penalty, random_seed=random_seed, cv_repeats=cv_repeats)
        roc = combined["roc"]
        roc.band = sensitivity_band(combined["scores"], cohort.positive, roc.direction, random_seed=random_seed)
        rocs.append(roc)
        combined_results[combination] = {
            "auc_apparent": roc.auc,
            "ci_low": roc.ci_low,
            "ci_high": roc.ci_high,
            "auc_cv": combined["auc_cv"],
            "auc_cv_sd": combined["auc_cv_sd"],
            "delong_p_vs": combined["delong_p_vs"],
            "sensitivity": roc.sensitivity,
            "specificity": roc.specificity,
            "sensitivity_ci": list(roc.sensitivity_ci),
            "specificity_ci": list(roc.specificity_ci),
            "separated": combined["separated"],
        }
    return markers, combined_results, rocs, comparison


def analyze(cohort, combinations=(), *, penalty="none", bootstrap=0, random_seed=0, cv_repeats=20):
    """The whole analysis, as in ``alsquant roc``; with covariates (`read_cohort`'s ``covariates``), once more on
    the markers adjusted for them (`fit_adjustment`).

    Returns
    -------
    results : dict
        ``markers`` (per marker: auc, ci_low, ci_high, direction, threshold, sensitivity, specificity,
        mannwhitney_p, ...), ``combinations`` (per "A+B": auc_apparent, ci_low, ci_high, auc_cv, delong_p_vs,
        separated), ``groups`` (counts), ``excluded`` (`Cohort.excluded`), ``penalty``; with covariates,
        ``adjusted``: the `Adjustment` (covariates, levels, coefficients, sd, ranges) with ``markers`` and
        ``combinations`` as above, of the adjusted z-scores.
    rocs : list of MarkerROC
        Single markers, then combinations (unadjusted).
    comparison : list of dict
        `group_comparison` rows (unadjusted).
    """
    arguments = (combinations, penalty, bootstrap, random_seed, cv_repeats)
    markers, combined, rocs, comparison = _analysis(cohort, *arguments)
    results = {
        "markers": markers,
        "combinations": combined,
        "groups": {cohort.positive_label: cohort.n_positive, cohort.negative_label: cohort.n_negative},
        "excluded": cohort.excluded,
        "penalty": penalty,
    }
    if cohort.covariates:
        adjustment = fit_adjustment(cohort)
        markers, combined, _, _ = _analysis(adjusted(cohort, adjustment), *arguments)
        results["adjusted"] = {**adjustment.as_dict(), "markers": markers, "combinations": combined}
    return results, rocs, comparison


# ----------------------------------------------------------------------------------------------------------------
# Adjustment for age (and sex)
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Adjustment:
    """Markers adjusted for covariates (age, sex), as normative modelling does: each marker regressed on the
    covariates in the negative group (the controls; ordinary least squares, R's ``lm``), and every subject's value
    turned into a z-score against the controls' prediction for its covariates, (value − prediction) / residual SD.
    ALS patients are older than typical controls, and MK, FA and χ change with age: without it, age passes for
    disease."""

    covariates: list
    """Covariate columns, in the order of the coefficients."""
    levels: dict
    """Categorical covariate → the level coded 1 (the other is 0), e.g. ``{"sex": "M"}``."""
    coefficients: dict
    """Marker → [intercept, one per covariate]."""
    sd: dict
    """Marker → residual standard deviation (n − 1 − number of covariates degrees of freedom, as ``lm``'s sigma)."""
    ranges: dict
    """Numeric covariate → [min, max] in the controls: a subject beyond it is extrapolated."""

    def design(self, covariates, where="subject"):
        """The design matrix (a column of ones, then the covariates coded as numbers) for covariate values:
        name → array (or one value each)."""
        columns = [np.ones(np.size(covariates[self.covariates[0]]) if self.covariates else 1)]
        for name in self.covariates:
            values = np.atleast_1d(covariates[name])
            if name in self.levels:
                columns.append((values.astype(str) == self.levels[name]).astype(float))
            else:
                try:
                    columns.append(values.astype(float))
                except ValueError:
                    raise InputError(f"{where}: covariate {name!r} must be a number, got {values.tolist()}") from None
        return np.column_stack(columns)

    def z_scores(self, markers, covariates, where="subject"):
        """Marker → adjusted z-scores, for values (marker → array or value) and their subjects' covariates."""
        design = self.design(covariates, where)
        return {
            m: (np.asarray(values, float) - design @ np.asarray(self.coefficients[m])) / self.sd[m]
            for m, values in markers.items()
        }

    def as_dict(self):
        return dataclasses.asdict(self)


def _coded(name, values):
    """A covariate column as numbers, or, if not numeric, a two-level category: (values, the level coded 1 or
    None)."""
    try:
        return np.array([float(v) for v in values]), None
    except (TypeError, ValueError):
        pass
    levels = sorted({str(v).strip() for v in values})
    if len(levels) != 2:
        raise InputError(
            f"cohort table: covariate {name!r} must be numeric or take two values (e.g. sex M/F), got "
            f"{', '.join(levels)}"
        )
    return np.array([str(v).strip() for v in values]), levels[1]


def fit_adjustment(cohort):
    """Fit `Adjustment` on the cohort's negative group for its covariates (`read_cohort`'s ``covariates``)."""
    names = list(cohort.covariates)
    controls = ~cohort.positive
    levels = {}
    for name in names:
        coded, level = _coded(name, cohort.covariates[name])
        if level is not None:
            levels[name] = level
    n, p = int(controls.sum()), 1 + len(names)
    if n < p + 3:
        raise InputError(
            f"adjustment for {', '.join(names)}: {n} {cohort.negative_label} subjects fit {p} coefficients a marker; "
            f"at least {p + 3} are needed"
        )
    adjustment = Adjustment(names, levels, {}, {}, {})
    design = adjustment.design({k: np.asarray(v)[controls] for k, v in cohort.covariates.items()}, "cohort table")
    if np.linalg.matrix_rank(design) < p:
        raise InputError(
            f"adjustment for {', '.join(names)}: the {cohort.negative_label} subjects' covariates do not vary "
            "independently (e.g. one sex only); adjust for fewer"
        )
    for marker, values in cohort.markers.items():
        beta, *_ = np.linalg.lstsq(design, values[controls], rcond=None)
        residual = values[controls] - design @ beta
        adjustment.coefficients[marker] = beta.tolist()
        adjustment.sd[marker] = float(np.sqrt(residual @ residual / (n - p)))
    for name in names:
        if name not in levels:
            column = np.asarray(cohort.covariates[name], float)[controls]
            adjustment.ranges[name] = [float(column.min()), float(column.max())]
    return adjustment


def adjusted(cohort, adjustment):
    """The cohort with each marker replaced by its adjusted z-score (`Adjustment.z_scores`)."""
    return dataclasses.replace(cohort, markers=adjustment.z_scores(cohort.markers, cohort.covariates, "cohort table"))
