"""Errors the shell package raises for users: each message names what was wrong."""


class BeamstreamError(Exception):
    """An error meant for a person: the CLI prints its message on one line, no traceback."""


class SettingError(BeamstreamError):
    """A setting (environment variable or config-file key) has a bad value; the message names it."""
