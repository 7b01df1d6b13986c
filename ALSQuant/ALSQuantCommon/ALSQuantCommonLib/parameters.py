"""A module's parameter node holds its step's options, declared once in ``ALSQuantLib`` (`ALSQuantLib.options`).

`withOptions` adds one typed field per option (camelCase: ``cortex_margin_mm`` → ``cortexMarginMm``, with its
default and, for a choice, Slicer's ``Choice`` validator) to a ``@parameterNodeWrapper`` class, before the wrapper
reads the class; `optionsFrom` reads them back into the options dataclass. Adding an option then touches the
dataclass, the function that uses it, and one widget of the panel's ``.ui`` (its ``SlicerParameterName``).
"""

from typing import Annotated

from ALSQuantLib import options as options_lib


def withOptions(optionsClass):
    """Class decorator, applied under ``@parameterNodeWrapper``: add `optionsClass`'s fields to the class."""

    def add(cls):
        try:
            from slicer.parameterNodeWrapper import Choice
        except ImportError:  # outside Slicer: plain types, no validator
            Choice = None
        annotations = dict(cls.__dict__.get("__annotations__", {}))
        for name, spec in options_lib.parameter_fields(optionsClass).items():
            if name in annotations:
                raise TypeError(f"{cls.__name__}.{name}: declared by hand and by {optionsClass.__name__}")
            annotations[name] = (
                Annotated[spec.type, Choice(list(spec.choices))] if spec.choices and Choice else spec.type
            )
            setattr(cls, name, spec.default)
        cls.__annotations__ = annotations
        cls.optionsClass = optionsClass
        return cls

    return add


def optionsFrom(parameterNode, optionsClass=None):
    """The options dataclass from a parameter node wrapped by a class made with `withOptions`."""
    optionsClass = optionsClass or type(parameterNode).optionsClass
    names = options_lib.parameter_fields(optionsClass)
    return options_lib.from_parameters(optionsClass, {name: getattr(parameterNode, name) for name in names})


def toolTips(optionsClass):
    """camelCase parameter name → the option's help, for the panel's tooltips."""
    return {name: spec.help for name, spec in options_lib.parameter_fields(optionsClass).items()}
