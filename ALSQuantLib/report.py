"""Figures (matplotlib, Agg backend): the labels over a subject's images, and a self-contained HTML report of an ROC
analysis."""

import base64
import datetime
import html
from pathlib import Path

import numpy as np

from . import __version__, geometry, io, outputs, stats


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, stem):
    """Write PNG and SVG atomically; return the PNG path."""
    paths = []
    for suffix in (".png", ".svg"):
        path = Path(f"{stem}{suffix}")
        with outputs.atomic_path(path) as tmp:
            fig.savefig(tmp, format=suffix[1:], dpi=150, bbox_inches="tight")
        paths.append(path)
    return paths[0]


def labels_figure(path, panels, title=""):
    """Labels over their images, three planes through the labels' centre: one row per ``(name, image, labels,
    affine)`` in `panels` (image and labels on one grid), labels coloured by value over the image in grey, shown in
    RAS (the subject's right on the right); a PNG written atomically. For checking a labelling by eye."""
    import nibabel as nib

    plt = _pyplot()
    fig, axes = plt.subplots(len(panels), 3, figsize=(10, 3.4 * len(panels)), squeeze=False)
    for row, (name, image, labels, affine) in zip(axes, panels):
        orientation = nib.orientations.io_orientation(affine)  # voxel axis j → RAS axis orientation[j, 0]
        image, labels = (nib.orientations.apply_orientation(np.asarray(a), orientation) for a in (image, labels))
        sizes = np.empty(3)
        sizes[orientation[:, 0].astype(int)] = geometry.voxel_sizes(affine)
        found = np.argwhere(labels > 0)
        centre = found.mean(axis=0).astype(int) if len(found) else np.array(image.shape) // 2
        finite = image[np.isfinite(image)]
        top = np.percentile(finite, 99.5) if finite.size else 1.0
        bottom = min(0.0, np.percentile(finite, 0.5)) if finite.size else 0.0  # a χ map has negative values
        colours = np.where(labels > 0, (labels - 1) % 20 + 1, 0).astype(float)
        for ax, axis, plane in zip(row, (2, 1, 0), ("axial", "coronal", "sagittal")):
            across, up = (a for a in range(3) if a != axis)
            extent = (0, image.shape[across] * sizes[across], 0, image.shape[up] * sizes[up])
            ax.imshow(
                np.take(image, centre[axis], axis).T,
                cmap="gray",
                origin="lower",
                vmin=bottom,
                vmax=top,
                extent=extent,
            )
            overlay = np.ma.masked_equal(np.take(colours, centre[axis], axis).T, 0)
            ax.imshow(
                overlay,
                cmap="tab20",
                vmin=1,
                vmax=20,
                origin="lower",
                alpha=0.55,
                extent=extent,
                interpolation="nearest",
            )
            ax.set_title(f"{name}, {plane}", fontsize=9)
            ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with outputs.atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
    return Path(path)


def motion_figure(path, table):
    """Head motion per volume (`ALSQuantLib.motion.parameters`: rotations in degrees, then shifts in mm, then the
    eddy-current distortion in % when corrected, per row), a panel each against the volume number."""
    plt = _pyplot()
    eddy = table.shape[1] > 6
    fig, axes = plt.subplots(3 if eddy else 2, 1, figsize=(8, 7 if eddy else 5), sharex=True)
    for k, axis in enumerate("xyz"):
        axes[0].plot(table[:, k], label=f"about {axis}")
        axes[1].plot(table[:, 3 + k], label=f"along {axis}")
        if eddy:
            axes[2].plot(table[:, 6 + k], label=f"per mm along {axis}")
    axes[0].set_ylabel("rotation (°)")
    axes[1].set_ylabel("shift of the centre (mm)")
    if eddy:
        axes[2].set_ylabel("eddy currents:\nstretch along the\nphase axis (%)")
    axes[-1].set_xlabel("volume")
    for ax in axes:
        ax.legend(loc="upper right", fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Head motion{' and eddy currents' if eddy else ''} against the mean b = 0 image", fontsize=10)
    fig.tight_layout()
    with outputs.atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(path)


def roc_figure(rocs, stem, title="ROC curves", combinations=None):
    """ROC curves of single and combined markers, each labelled with its plain name (`marker_name`), its AUC and
    DeLong 95 % CI; a combination's (`combinations`: name → `stats.analyze` result) also with its cross-validated
    AUC; each curve's confidence band (`stats.sensitivity_band`) shaded, when computed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 6))
    for roc in rocs:
        result = (combinations or {}).get(roc.name, roc.summary())
        (line,) = ax.plot(
            1 - roc.curve["specificity"],
            roc.curve["sensitivity"],
            lw=2,
            label=f"{marker_name(roc.name)}: {stats.auc_text(result)}",
        )
        if roc.band is not None:
            band = roc.band
            ax.fill_between(1 - band["specificity"], band["low"], band["high"], color=line.get_color(), alpha=0.12)
    ax.plot([0, 1], [0, 1], color="0.7", ls="--", lw=1)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    path = _save(fig, stem)
    plt.close(fig)
    return path


def group_figure(cohort, stem):
    """Box and strip plots per marker and group (like the study's figure)."""
    plt = _pyplot()
    markers = list(cohort.markers)
    columns = min(len(markers), 2)
    rows = -(-len(markers) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 4 * rows), squeeze=False)
    for ax in axes.flat[len(markers) :]:
        ax.set_axis_off()
    rng = np.random.default_rng(0)
    for ax, marker in zip(axes.flat, markers):
        values = cohort.markers[marker]
        groups = [values[~cohort.positive], values[cohort.positive]]
        ax.boxplot(groups, widths=0.5, showfliers=False)
        for k, group in enumerate(groups, 1):
            ax.scatter(k + rng.uniform(-0.12, 0.12, group.size), group, s=12, alpha=0.7, color="C0" if k == 1 else "C3")
        ax.set_xticks([1, 2], [cohort.negative_label, cohort.positive_label])
        ax.set_title(marker_name(marker), fontsize=9)
    fig.tight_layout()
    path = _save(fig, stem)
    plt.close(fig)
    return path


MARKER_NAMES = {
    "cst_mk": "CST mean kurtosis",
    "cst_md": "CST mean diffusivity (mm²/s)",
    "cst_fa": "CST fractional anisotropy",
    "m1_ms": "M1 magnetic susceptibility (ppm)",
}
"""Plain names, with units, of the study's markers (`pipeline.MARKERS`) in reports and figures."""


def marker_name(marker):
    """A marker's plain name (`MARKER_NAMES`; a combination's parts joined by " + "; else the column's own)."""
    return " + ".join(MARKER_NAMES.get(part, part) for part in str(marker).split("+"))


def format_p(p):
    """A p-value as papers print it: "<0.001" below 0.001, else three decimals below 0.01 and two above.

    >>> [format_p(p) for p in (1.584e-05, 0.00432, 0.0468, 0.5)]
    ['<0.001', '0.004', '0.05', '0.50']
    """
    if p is None or not np.isfinite(p):
        return ""
    return "<0.001" if p < 0.001 else f"{p:.3f}" if p < 0.01 else f"{p:.2f}"


def _is_p(column):
    column = str(column)
    return column == "p" or column.endswith("_p") or "_p_" in column


def _table(rows):
    columns = list(dict.fromkeys(key for row in rows for key in row))  # every row's, as `io.write_table`
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)

    def cell(column, value):
        if _is_p(column) and isinstance(value, (float, int)) and not isinstance(value, bool):
            return html.escape(format_p(value))
        if isinstance(value, Link):
            return f'<a href="{html.escape(value.href)}">{html.escape(str(value))}</a>'
        if isinstance(value, float):
            return f"{value:.4g}"
        return html.escape(str(value))

    body = "".join("<tr>" + "".join(f"<td>{cell(c, r.get(c, ''))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _embed(png):
    return f'<img alt="{png.name}" src="data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}">'


class Link(str):
    """A table cell that links to `href` (relative to the page)."""

    def __new__(cls, text, href):
        cell = super().__new__(cls, text)
        cell.href = str(href)
        return cell


def html_report(path, *, title, summary, tables, figures, notes=(), only_if_changed=False):
    """A self-contained HTML page: summary lines, tables (title → rows; p-value columns as `format_p`, `Link`
    cells as links), figures embedded as base64 PNG, each the page's width. With `only_if_changed`, a page already
    there with the same content is not rewritten (a rerun on a full disk still succeeds)."""
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}th{background:#eee}"
        "img{max-width:100%;display:block;margin:1em 0}</style>",
        f"</head><body><h1>{html.escape(title)}</h1>",
        "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in summary) + "</ul>",
    ]
    for heading, rows in tables.items():
        parts += [f"<h2>{html.escape(heading)}</h2>", _table(rows)]
    if figures:
        parts += ["<h2>Figures</h2>", "".join(_embed(Path(f)) for f in figures)]
    if notes:
        parts += ["<h2>Notes</h2>", "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>"]
    parts.append("</body></html>")
    text = "\n".join(parts)
    path = Path(path)
    if not (only_if_changed and path.is_file() and path.read_text() == text):
        io.write_text(path, text)
    return path


def subject_page(path, result, quality, pictures):
    """One subject's page (``subject.html``), to check its result by eye: the quality check's verdict and flags,
    the markers by their plain names, the pictures (the labels over FA and the GRE magnitude, the maps with the
    labels, the head motion) embedded. Rewritten only when its content changes."""
    flags = quality.get("flags", [])
    summary = [
        f"group: {result.get('group') or 'not given'}",
        "quality check: passed" if not flags else f"quality check: FLAGGED ({len(flags)})",
        *[f"flag: {flag}" for flag in flags],
    ]
    markers = [
        {"marker": marker_name(k), "value": v}
        for k, v in result.items()
        if k not in ("participant_id", "group", "qc_passed", "stages_run")
    ]
    figures = [p for p in pictures if Path(p).is_file()]
    notes = [
        "Files beside this page: markers.json; label/roi_stats.csv and quality.json; each stage's provenance.json.",
        RESEARCH_USE,
    ]
    title = f"ALSQuant: {result['participant_id']}"
    tables = {"Markers": markers}
    return html_report(
        path, title=title, summary=summary, tables=tables, figures=figures, notes=notes, only_if_changed=True
    )


def cohort_page(path, rows, failures, subject_pages):
    """The cohort's page (``index.html``): every measured subject with its markers, its quality verdict and a link to
    its page (`subject_page`; `subject_pages`: subject → path relative to `path`), and the failed subjects."""
    table = [
        {
            "subject": Link(r["participant_id"], subject_pages[r["participant_id"]]),
            "group": r["group"],
            **{marker_name(k): v for k, v in r.items() if k not in ("participant_id", "group", "qc_passed")},
            "quality check": "passed" if r["qc_passed"] else "FLAGGED",
        }
        for r in rows
    ]
    flagged = sum(not r["qc_passed"] for r in rows)
    summary = [f"{len(rows)} subjects measured ({flagged} flagged by the quality check), {len(failures)} failed"]
    tables = {"Subjects": table}
    if failures:
        tables["Failed"] = [{"subject": s, "error": e} for s, e in failures.items()]
    notes = ["roc leaves the flagged subjects out by default (--no-exclude-failed-qc keeps them).", RESEARCH_USE]
    return html_report(path, title="ALSQuant cohort", summary=summary, tables=tables, figures=[], notes=notes)


RESEARCH_USE = (
    "For research use only: ALSQuant's markers, ROC analyses and diagnoses are not validated for clinical diagnosis "
    "and must not guide the care of a patient."
)

REFERENCE_STUDY = (
    "The reference study, for comparison (the clinical study ALSQuant follows: 35 ALS patients and 22 controls, GE "
    "3 T; DKI at b = 0, 1000 and 2500 s/mm², 20 directions; single-echo QSM, TE 15 ms): CST MK lower in ALS "
    "(controls 1.02-1.14, median 1.09; ALS 0.92-1.08, median 1.04), CST MD higher (controls 0.77-0.84, ALS "
    "0.78-0.88 × 10⁻³ mm²/s), CST FA unchanged, M1 susceptibility higher (controls 0.008-0.26 ppm, median 0.14; ALS "
    "0.15-0.40 ppm, median 0.23); MK and susceptibility combined: AUC 0.91, sensitivity 83 %, specificity 88 %. Its "
    "values belong to its scanner, protocol and processing: compare directions and separations, not cut-offs."
)


def _flat(result):
    """A result's figures as table columns: an interval (``sensitivity_ci``) as ``*_low`` and ``*_high``, each
    DeLong p against a single marker as ``delong_p_vs_<marker>``."""
    row = {}
    for key, value in result.items():
        if isinstance(value, (list, tuple)):
            row.update({f"{key}_low": value[0], f"{key}_high": value[1]})
        elif isinstance(value, dict):
            row.update({f"{key}_{name}": v for name, v in value.items()})
        else:
            row[key] = value
    return row


def _direction(result, cohort):
    """pROC's direction in words: "<" means the positive group (ALS) has the higher values."""
    higher = result["direction"] == "<"
    return f"{'higher' if higher else 'lower'} in {cohort.positive_label}"


def write_roc_outputs(out_dir, cohort, results, rocs, comparison, run=None):
    """results.json, the tables as CSV (with ``table_one.csv``, `stats.table_one`), ROC and group figures (PNG +
    SVG) and report.html in `out_dir`. `run`: the inputs and parameters (name → value) to record, with the
    version and the date added."""
    out_dir = outputs.prepare_folder(out_dir, "report folder")
    run = {
        "alsquant": __version__,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        **(run or {}),
    }
    results = {**results, "run": run}
    io.write_json(out_dir / "results.json", results)
    demographics = stats.table_one(cohort)
    if demographics:
        io.write_table(out_dir / "table_one.csv", demographics)
    io.write_table(out_dir / "group_comparison.csv", comparison)
    marker_rows = [{"marker": m, **_flat(r)} for m, r in results["markers"].items()]
    io.write_table(out_dir / "roc_markers.csv", marker_rows)
    combination_rows = [{"combination": c, **_flat(r)} for c, r in results["combinations"].items()]
    if combination_rows:
        io.write_table(out_dir / "roc_combinations.csv", combination_rows)
    bands = [
        {"marker": roc.name, "specificity": sp, "sensitivity_low": low, "sensitivity_high": high}
        for roc in rocs
        if roc.band is not None
        for sp, low, high in zip(roc.band["specificity"], roc.band["low"], roc.band["high"])
    ]
    if bands:
        io.write_table(out_dir / "roc_bands.csv", bands)
    figures = [
        roc_figure(rocs, out_dir / "roc_curves", combinations=results["combinations"]),
        group_figure(cohort, out_dir / "groups"),
    ]
    summary = [f"{cohort.n_positive} {cohort.positive_label}, {cohort.n_negative} {cohort.negative_label}"]
    left_out = stats.excluded_text(cohort)
    summary += [f"left out: {left_out}"] if left_out else []
    summary += [
        f"{marker_name(m)}: {_direction(r, cohort)}; {stats.auc_text(r, 3)} (DeLong 95 % CI); cut-off "
        f"{r['threshold']:.4g}: sensitivity {r['sensitivity']:.2f} [{r['sensitivity_ci'][0]:.2f}-"
        f"{r['sensitivity_ci'][1]:.2f}], specificity {r['specificity']:.2f} [{r['specificity_ci'][0]:.2f}-"
        f"{r['specificity_ci'][1]:.2f}]; Mann-Whitney p {format_p(r['mannwhitney_p'])}"
        for m, r in results["markers"].items()
    ]
    summary += [f"{marker_name(c)}: {stats.auc_text(r, 3)}" for c, r in results["combinations"].items()]
    notes = [
        "AUC CIs by DeLong's method (Sun & Xu fast algorithm); cut-offs maximise Youden's J; sensitivity and "
        "specificity CIs are Wilson intervals; p-values are two-sided Mann-Whitney U as R's wilcox.test computes "
        "them (exact below 50 a group without ties, else the normal approximation with continuity correction), "
        "with Holm correction.",
        "Shaded around each ROC curve: the 95 % confidence band of the sensitivity at specificities 0, 0.05, ..., 1 "
        f"(stratified bootstrap, {stats.BAND_RESAMPLES} resamples, as pROC's ci.se; roc_bands.csv).",
        "Combined markers: logistic regression ("
        + ("maximum likelihood, as R's glm" if results["penalty"] == "none" else "L2-penalised, C = 1")
        + "); the apparent AUC is optimistic, the cross-validated AUC (repeated stratified k-fold) is not.",
    ]
    tables = {"Table 1: the groups": demographics} if demographics else {}
    tables.update({"Group comparison": comparison, "Single markers": marker_rows})
    if combination_rows:
        tables["Combined markers"] = combination_rows
    adjusted = results.get("adjusted")
    if adjusted:
        covariates = ", ".join(adjusted["covariates"])
        summary += [
            f"{marker_name(name)} adjusted for {covariates}: {stats.auc_text(r, 3)}"
            for name, r in {**adjusted["markers"], **adjusted["combinations"]}.items()
        ]
        notes.append(
            f"Adjusted for {covariates}: each marker regressed on them in the {cohort.negative_label} group "
            "(ordinary least squares, as R's lm), every subject's value a z-score against that prediction, (value - "
            "prediction) / residual SD; the adjusted AUCs are those of the z-scores."
        )
        tables[f"Single markers, adjusted for {covariates}"] = [
            {"marker": m, **_flat(r)} for m, r in adjusted["markers"].items()
        ]
        fits = [
            {
                "marker": m,
                **dict(zip(["intercept", *adjusted["covariates"]], adjusted["coefficients"][m])),
                "residual_sd": adjusted["sd"][m],
            }
            for m in adjusted["markers"]
        ]
        tables[f"Fits in the {cohort.negative_label} group"] = fits
    notes.append(
        "Direction: pROC's convention; '<' means the "
        f"{cohort.positive_label} group has the higher values, '>' the lower. Markers: "
        + "; ".join(f"{m} = {marker_name(m)}" for m in results["markers"])
        + "."
    )
    tables["Run"] = [{"item": k, "value": ", ".join(map(str, v)) if isinstance(v, list) else v} for k, v in run.items()]
    notes += [REFERENCE_STUDY, RESEARCH_USE]
    return html_report(
        out_dir / "report.html",
        title="ALSQuant ROC analysis",
        summary=summary,
        tables=tables,
        figures=figures,
        notes=notes,
    )
