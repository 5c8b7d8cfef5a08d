"""Errors the user can fix. The plugin turns each into a one-line pytest usage error."""


class HarnessUsageError(Exception):
    """Bad input from the user: the message is one line that says what to change."""
