"""Command-line error handling shared by the tools: an error that bad input causes prints its message and exits 1,
with no traceback. The library functions raise as usual; only a tool's main() turns their errors into messages."""

import sys
from contextlib import contextmanager

from huggingface_hub.errors import StrictDataclassError

# What bad input raises: a wrong argument or file (ValueError), a missing, unreadable or existing folder and Hub HTTP
# errors (OSError), a value LandmarkLlamaConfig's validators refuse. Anything else is a bug and keeps its traceback.
INPUT_ERRORS = (ValueError, OSError, StrictDataclassError)


def message(error):
    """The error's own words; for a config validator's error, those of the error it wraps (which name the field)."""
    while isinstance(error, StrictDataclassError) and error.__cause__ is not None:
        error = error.__cause__
    return str(error)


@contextmanager
def exit_with_message(*more_errors):
    """An input error (or one of `more_errors`) raised inside the block prints `error: <message>` to stderr and
    exits with status 1."""
    try:
        yield
    except (*INPUT_ERRORS, *more_errors) as error:
        print(f"error: {message(error)}", file=sys.stderr)
        sys.exit(1)
