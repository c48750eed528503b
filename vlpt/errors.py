"""vlpt's own error type: the command line prints it as one line and exits with code 2; anything else is a bug and
keeps its traceback."""
from __future__ import annotations


class VlptError(Exception):
    """A user-facing error: bad input, a bad value, a missing or incompatible file."""


class ConfigError(VlptError, ValueError):
    """A config key or value that cannot be used."""


class MissingFileError(VlptError, FileNotFoundError):
    """A file or folder the user named (a config, an annotation file, weights, a vocab) is not there."""
