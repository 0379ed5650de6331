"""The error a user gets when a merge cannot be done as asked.

It subclasses ``ValueError`` so that callers who catch the builtin keep working; the command
line turns it (and the other ``ValueError`` / ``FileNotFoundError`` subclasses of the package)
into exit code 2 and one line.
"""
from __future__ import annotations


class MergeError(ValueError):
    """The models (or the request) cannot be merged; the message says why."""


class MergeWarning(UserWarning):
    """Something the merge can do but the user should know (too little data, ...); the
    report's ``warnings`` lists the same texts and the CLI prints them once."""
