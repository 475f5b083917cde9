"""The one error type a user sees: a clear message, exit status 2, no traceback."""


class NlmError(Exception):
    """Bad input from the user: a file, a key or a value. The message names it."""
