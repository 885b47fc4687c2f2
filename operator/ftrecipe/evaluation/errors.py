"""The one error type of the evaluation: something the user can fix, reported as one line with exit code 2."""

from __future__ import annotations


class EvalError(Exception):
    """Bad input (data, model, adapter, endpoint, options): the message names what and the fix, in one line."""
