"""Exceptions raised for input a user can correct."""


class InputError(ValueError):
    """An input (a file, an array, an option) is not what the library expects.

    The message names the input and says what was expected.
    """
