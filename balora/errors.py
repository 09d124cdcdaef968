"""Errors meant for users: one line that names the file or module and says what to do."""


class InputError(ValueError):
    """Bad user input (a file, a folder, a flag). The CLI prints only its message, exit code 2."""
