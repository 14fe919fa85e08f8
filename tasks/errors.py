"""The kinds of failure, as types: what a user must fix, what may pass on a retry, and what ran out."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (data, params, files). Reported as one message, without a traceback."""
