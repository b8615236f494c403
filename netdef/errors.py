"""The one exception type for problems in a user's definition files."""


class DefinitionError(ValueError):
    """A net, solver, weights or data file that brewnet cannot use.

    The message is a single line that names the file (and the line/column or
    field where known) and what was expected; the CLI prints it as it is.
    """

    def __init__(self, message, path=None, line=None, column=None):
        self.path = str(path) if path is not None else None
        self.line = line
        self.column = column
        self.reason = message
        where = ""
        if self.path is not None:
            where = self.path
            if line is not None:
                where += f":{line}"
                if column is not None:
                    where += f":{column}"
            where += ": "
        super().__init__(where + message)
