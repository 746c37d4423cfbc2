"""User-facing errors: printed as one line by ``run.py`` with a non-zero exit, no stack trace."""


class UserError(Exception):
    """Bad input from the user (config, files, hardware request); the message says what to fix."""
