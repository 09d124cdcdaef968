"""Errors meant for users: one line that names the file or module and says what to do."""


class InputError(ValueError):
    """Bad user input (a file, a folder, a flag). The CLI prints only its message, exit code 2.

    Messages quote key names, paths and metadata from files anyone may have written, so control
    characters in them (ANSI escapes, carriage returns, newlines) are shown escaped: the message
    stays one line and cannot rewrite the user's terminal.
    """

    def __str__(self) -> str:
        from balora.safe_io import printable  # safe_io raises InputError: imported when first needed

        return printable(super().__str__())
