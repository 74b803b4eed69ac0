"""User-facing errors: reported as one line and a non-zero exit, never a traceback."""


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing data, unknown checkpoint)."""
