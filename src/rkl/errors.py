"""Errors a user can cause and fix. The CLI prints them on one line and exits with code 2, no traceback."""


class UserError(Exception):
    """Bad input: a missing checkpoint, a wrong model type, a bad flag. The message names cause and fix."""


class ConfigError(UserError, ValueError):
    """A configuration problem; the message names the offending key."""
