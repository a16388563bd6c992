"""The one exception type for mistakes a user can make.

A `UserError` carries a sentence that says what went wrong, where (file, row,
config key) and what to do.  The CLI prints it without a traceback and exits 2;
anything else that escapes is our bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input (config, data file, model path)."""
