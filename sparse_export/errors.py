class UserError(Exception):
    """Bad input or a failed step the user can act on; the CLI prints it as one line."""
