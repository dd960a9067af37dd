"""The one exception type that the CLI turns into a clean message and a non-zero exit."""


class UserError(Exception):
    """Bad input from the user (file, config, flag): the message says where and what to do.

    The CLI prints it without a traceback; library callers can catch it like any exception.
    """
