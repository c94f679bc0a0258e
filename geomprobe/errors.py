"""The one exception type for mistakes a user can make.

The CLI turns a :class:`GeomprobeError` into a one-line message and a non-zero exit code
(one place: ``geomprobe/cli/app.py``, ``_GeomprobeGroup.invoke``); library callers can catch it like any other exception.
"""

from __future__ import annotations


class GeomprobeError(Exception):
    """A problem with the user's input (options, files, specs), not a bug in geomprobe."""

    exit_code = 2


class UsageError(GeomprobeError):
    """Malformed or out-of-range options or specs (a t-spec, a class list, a preset name)."""


class DataError(GeomprobeError):
    """A dataset or result file is missing, malformed, corrupt or from another run."""

    exit_code = 3
