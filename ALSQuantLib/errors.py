"""Exceptions raised for problems a user can correct."""


class InputError(ValueError):
    """An input (a file, an array, an option) is not what the library expects.

    The message names the input and says what was expected.
    """


class OutputError(InputError):
    """An output cannot be written: the folder is a file, read-only, full, or in use by another run.

    The message names the path and the cause ("no space left on device: PATH"). It is an `InputError` so that every
    front end reports it the same way, as something the user can correct.
    """
