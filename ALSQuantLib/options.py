"""Options declared once, and everything that is derived from the declaration.

Each step's options are a frozen dataclass beside the code they configure (`ALSQuantLib.dki.DKIOptions`,
`ALSQuantLib.qsm.QSMOptions`, `ALSQuantLib.atlas.LabelingOptions`); each field is declared with `option`, which
holds its default, help, unit, choices and command-line flag. From that one declaration:

* `add_arguments` builds the command line's arguments (a composed dataclass, such as the pipeline's
  `SubjectOptions`, gets one argument group per step);
* `from_arguments` turns parsed arguments back into the dataclass;
* `to_argv` writes an instance as command-line arguments (the Slicer modules run their steps as commands);
* `parameter_fields` and `from_parameters` map it onto a Slicer parameter node (camelCase names);
* provenance records ``dataclasses.asdict(options)``.

Examples
--------
>>> import argparse
>>> from dataclasses import dataclass
>>> @dataclass(frozen=True)
... class ExampleOptions:
...     method: str = option("a", "the method", choices=("a", "b"))
...     radius_mm: float = option(2.0, "a radius", unit="mm", flag="--radius")
...     smooth: bool = option(True, "smooth first", flag="--no-smooth")
>>> parser = argparse.ArgumentParser()
>>> add_arguments(parser, ExampleOptions)
>>> options = from_arguments(ExampleOptions, parser.parse_args(["--radius", "3", "--no-smooth"]))
>>> options
ExampleOptions(method='a', radius_mm=3.0, smooth=False)
>>> from_arguments(ExampleOptions, parser.parse_args(["--smooth"])).smooth
True
>>> to_argv(options)
['--radius', '3.0', '--no-smooth']
>>> parameter_fields(ExampleOptions)["radiusMm"].default
2.0
"""

import argparse
import dataclasses
import pathlib
import typing
from typing import NamedTuple

from .errors import InputError


def option(default, help, *, unit=None, choices=None, flag=None, aliases=(), path=False, several=False):
    """A dataclass field declaring one option.

    Parameters
    ----------
    default
        Default value (immutable: a tuple for lists).
    help : str
        What the option does, for the command line's help and the Slicer tooltips.
    unit : str, optional
        Physical unit (``"mm"``, ``"s"``), shown in the help.
    choices : sequence of str, optional
        Allowed values.
    flag : str, optional
        Command-line flag (default ``--field-name``). A boolean whose default is True is turned off by its flag
        (``--no-...``); ``--field-name`` is accepted too and leaves it on (scripts written when it was off by
        default keep working).
    aliases : sequence of str
        Other flags accepted for the same option (older names).
    path : bool
        The value is a file or folder (a path field in Slicer; ``None`` when not given).
    several : bool
        A string option whose value may name several of its choices, separated by commas (``"a,b"``); `choices`
        may also list such combinations, to offer them in Slicer.
    """
    metadata = {
        "help": help,
        "unit": unit,
        "choices": tuple(choices) if choices else None,
        "flag": flag,
        "aliases": tuple(aliases),
        "path": path,
        "several": several,
    }
    return dataclasses.field(default=default, metadata=metadata)


def _type(cls, field):
    """The field's value type: str, bool, int, float or tuple (``str | None`` counts as str)."""
    hint = typing.get_type_hints(cls)[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is tuple or hint is tuple:
        return tuple
    if args:  # Optional[X] / X | None
        return args[0]
    return hint


def _flag(field):
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def flag(cls, name):
    """The command-line flag of option `name` of `cls`, for messages that tell the user what to change.

    >>> from ALSQuantLib.dki import DKIOptions
    >>> flag(DKIOptions, "dti_only")
    '--dti-only'
    """
    return _flag(next(f for f in dataclasses.fields(cls) if f.name == name))


def _is_group(cls, field):
    hint = typing.get_type_hints(cls)[field.name]
    return dataclasses.is_dataclass(hint)


def _help(field):
    meta = field.metadata
    text = meta["help"]
    if field.default is True:
        text = f"{meta['help']}: on by default; {_flag(field)} turns it off"
    if field.default not in (None, "", ()) and not isinstance(field.default, bool):
        shown = ",".join(field.default) if isinstance(field.default, tuple) else field.default
        text += f" (default {shown}{' ' + meta['unit'] if meta['unit'] else ''})"
    elif meta["unit"]:
        text += f" ({meta['unit']})"
    return text


def _comma_list(text):
    return tuple(item.strip() for item in str(text).split(",") if item.strip())


def add_arguments(parser, cls):
    """Add one command-line argument per option of `cls` (argument groups for a composed dataclass)."""
    for field in dataclasses.fields(cls):
        if _is_group(cls, field):
            hint = typing.get_type_hints(cls)[field.name]
            add_arguments(parser.add_argument_group(f"{field.name} options"), hint)
            continue
        kind, flags = _type(cls, field), (_flag(field), *field.metadata["aliases"])
        if kind is bool:
            action = "store_false" if field.default else "store_true"
            parser.add_argument(*flags, dest=field.name, action=action, default=field.default, help=_help(field))
            positive = "--" + field.name.replace("_", "-")
            if field.default and positive not in flags:  # the flag of an option that used to be off by default
                parser.add_argument(positive, dest=field.name, action="store_true", help=argparse.SUPPRESS)
        elif kind is tuple:
            parser.add_argument(
                *flags, dest=field.name, type=_comma_list, default=field.default, metavar="A,B", help=_help(field)
            )
        elif field.metadata["several"]:
            parser.add_argument(
                *flags, dest=field.name, type=_several(field), default=field.default, metavar="A[,B]", help=_help(field)
            )
        else:
            metavar = field.metadata["unit"].upper() if field.metadata["unit"] and kind in (int, float) else None
            parser.add_argument(
                *flags,
                dest=field.name,
                type=kind,
                default=field.default,
                choices=field.metadata["choices"],
                metavar=metavar,
                help=_help(field),
            )


def from_arguments(cls, namespace):
    """The dataclass `cls` from parsed arguments (built by `add_arguments`)."""
    values = {}
    for field in dataclasses.fields(cls):
        if _is_group(cls, field):
            values[field.name] = from_arguments(typing.get_type_hints(cls)[field.name], namespace)
        else:
            values[field.name] = getattr(namespace, field.name)
    return cls(**values)


def to_argv(options):
    """Command-line arguments that give `options` back through `add_arguments` (defaults left out)."""
    cls, argv = type(options), []
    for field in dataclasses.fields(cls):
        value = getattr(options, field.name)
        if _is_group(cls, field):
            argv += to_argv(value)
        elif value == field.default:
            continue
        elif _type(cls, field) is bool:
            argv.append(_flag(field))
        elif _type(cls, field) is tuple:
            argv += [_flag(field), ",".join(str(v) for v in value)]
        elif value is not None:
            argv += [_flag(field), str(value)]
    return argv


def _items(field):
    """The single values a `several` option's choices are made of."""
    return tuple(dict.fromkeys(item for choice in field.metadata["choices"] for item in _comma_list(choice)))


def _several(field):
    def parse(text):
        items = _comma_list(text)
        unknown = [item for item in items if item not in _items(field)]
        if not items or unknown:
            raise argparse.ArgumentTypeError(
                f"{text!r}: expected one or more of {', '.join(_items(field))}, separated by commas"
            )
        return ",".join(items)

    return parse


def check_choices(options):
    """Refuse a value outside its option's choices, naming the option (for options built in code)."""
    for field in dataclasses.fields(options):
        choices, value = field.metadata.get("choices"), getattr(options, field.name)
        if choices and field.metadata.get("several"):
            unknown = [item for item in _comma_list(value) if item not in _items(field)]
            if unknown or not _comma_list(value):
                raise InputError(
                    f"option {field.name} {value!r}: expected one or more of {', '.join(_items(field))}, "
                    "separated by commas"
                )
        elif choices and value not in choices:
            raise InputError(f"option {field.name} {value!r}: expected one of {', '.join(choices)}")


# ----------------------------------------------------------------------------------------------------------------
# Slicer parameter nodes
# ----------------------------------------------------------------------------------------------------------------
def camel_case(name):
    """``cortex_margin_mm`` → ``cortexMarginMm`` (Slicer's parameter names)."""
    first, *rest = name.split("_")
    return first + "".join(part.capitalize() for part in rest)


class ParameterField(NamedTuple):
    """How an option appears in a Slicer parameter node."""

    option: str
    type: type
    default: object
    choices: tuple
    help: str


def parameter_fields(cls):
    """camelCase parameter name → `ParameterField` for each option of `cls`.

    Paths become `pathlib.Path` (empty when unset, which Slicer reads back as "."); tuples become comma-separated
    strings.
    """
    fields = {}
    for field in dataclasses.fields(cls):
        kind = _type(cls, field)
        default = field.default
        if kind is tuple:
            kind, default = str, ",".join(default)
        elif field.metadata["path"]:
            kind, default = pathlib.Path, pathlib.Path(default or "")
        fields[camel_case(field.name)] = ParameterField(
            field.name, kind, default, field.metadata["choices"], _help(field)
        )
    return fields


def from_parameters(cls, values):
    """The dataclass `cls` from parameter values (camelCase name → value, as `parameter_fields` declares them)."""
    out = {}
    for field in dataclasses.fields(cls):
        value = values[camel_case(field.name)]
        if field.metadata["path"]:
            value = str(value) if value is not None and str(value) not in ("", ".") else None
        elif _type(cls, field) is tuple:
            value = _comma_list(value)
        out[field.name] = value
    return cls(**out)
