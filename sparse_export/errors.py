"""The error type for bad input and failed steps the user can act on."""


class UserError(Exception):
    """Bad input or a failed step the user can act on; the CLI prints it as one line."""


class EngineCrash(UserError):
    """An inference engine died (a signal, or DeepSparse's own crash report) in a child process."""
