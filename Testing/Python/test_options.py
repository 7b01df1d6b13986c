"""Options declared once (ALSQuantLib.options): the command line, argv for background jobs and provenance all come
from the one declaration, and every command reaches every option of its steps."""

import argparse
import dataclasses

import pytest

from ALSQuantLib import cli, options, phantom
from ALSQuantLib.atlas import BUILTIN_ATLASES, LabelingOptions
from ALSQuantLib.dki import DKIOptions
from ALSQuantLib.errors import InputError
from ALSQuantLib.pipeline import SubjectOptions
from ALSQuantLib.qsm import QSMOptions

STEP_OPTIONS = (DKIOptions, QSMOptions, LabelingOptions)


def _changed(cls):
    """An instance whose every field differs from its default (and is valid)."""
    values = {}
    for field in dataclasses.fields(cls):
        if field.metadata["choices"]:
            values[field.name] = next(c for c in field.metadata["choices"] if c != field.default)
        elif field.metadata["path"]:
            values[field.name] = "/data/some file"
        elif isinstance(field.default, bool):
            values[field.name] = not field.default
        elif isinstance(field.default, tuple):
            values[field.name] = ("CST", "precentral_WM")
        else:
            values[field.name] = type(field.default)(field.default + 2)
    return cls(**values)


@pytest.mark.parametrize("cls", STEP_OPTIONS)
def test_every_option_is_declared_with_help_and_goes_through_the_command_line(cls):
    for field in dataclasses.fields(cls):
        assert field.metadata["help"], field.name
    parser = argparse.ArgumentParser()
    options.add_arguments(parser, cls)
    assert options.from_arguments(cls, parser.parse_args([])) == cls()  # the defaults are the declared ones
    changed = _changed(cls)
    assert options.from_arguments(cls, parser.parse_args(options.to_argv(changed))) == changed
    assert options.to_argv(cls()) == []


def test_run_subject_and_run_cohort_reach_every_option_of_every_step():
    changed = SubjectOptions(
        dki=_changed(DKIOptions), qsm=_changed(QSMOptions), labeling=_changed(LabelingOptions), gre_brain="magnitude"
    )
    for command in (["run-subject", "--dwi", "d", "--gre-magnitude", "m", "--gre-phase", "p"], ["run-cohort", "ds"]):
        args = cli.build_parser().parse_args([*command, "--out", "o", *options.to_argv(changed)])
        assert options.from_arguments(SubjectOptions, args) == changed
    # Older flags still work.
    args = cli.build_parser().parse_args(["qsm", "--magnitude", "m", "--phase", "p", "--out", "o", "--erosion-mm", "3"])
    assert options.from_arguments(QSMOptions, args).mask_erosion_mm == 3.0
    args = cli.build_parser().parse_args(["label", "--reference", "r", "--out", "o", "--erosion", "1"])
    assert options.from_arguments(LabelingOptions, args).erosion_voxels == 1


def test_choices_come_from_the_library_and_are_checked_in_code():
    combinations = ("jhu-tracts,harvard-oxford", "jhu-icbm-labels,harvard-oxford")
    assert dataclasses.fields(LabelingOptions)[0].metadata["choices"] == ("auto", *BUILTIN_ATLASES, *combinations)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["dki", "x.nii.gz", "--out", "o", "--fit-method", "NLLS"])
    # Several atlases: any comma list of known atlases, in the order given.
    parsed = cli.build_parser().parse_args(["label", "--reference", "f", "--out", "o", "--atlas", "harvard-oxford,eve"])
    assert parsed.atlas == "harvard-oxford,eve"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["label", "--reference", "f", "--out", "o", "--atlas", "jhu-tracts,nope"])
    options.check_choices(LabelingOptions(atlas="jhu-tracts,harvard-oxford"))
    with pytest.raises(InputError, match="option atlas 'jhu-tracts,nope': expected one or more of auto, eve"):
        options.check_choices(LabelingOptions(atlas="jhu-tracts,nope"))
    with pytest.raises(InputError, match="option inversion 'tikhonov': expected one of tkd, cg, tv"):
        options.check_choices(QSMOptions(inversion="tikhonov"))


def test_parameter_fields_are_camel_case_with_the_declared_defaults():
    fields = options.parameter_fields(LabelingOptions)
    assert fields["cortexMarginMm"].default == 3.0 and fields["cortexMarginMm"].option == "cortex_margin_mm"
    assert fields["rois"].default == "CST,M1" and fields["atlas"].choices[1 : len(BUILTIN_ATLASES) + 1] == tuple(
        BUILTIN_ATLASES
    )
    assert options.from_parameters(LabelingOptions, {n: f.default for n, f in fields.items()}) == LabelingOptions()


def test_phantom_atlas_regions_are_the_simulators_labels():
    """The phantom atlas's regions are data (atlases.json); they name the labels the simulator writes."""
    regions = BUILTIN_ATLASES["phantom"].regions
    assert {r.name: (*r.labels["left"], *r.labels["right"]) for r in regions} == phantom.REGIONS
