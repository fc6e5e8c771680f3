"""The two kinds of failure the CLI tells apart: invalid input (exit 2), any other (exit 1)."""


class UserError(Exception):
    """Invalid input: a recipe key, file, dataset, column or upstream output. Exit code 2.

    The message is printed as one line after ``error:`` and must name what is wrong.
    """

    exit_code = 2


class StageFailed(Exception):
    """A stage ran but its result failed a check (for example a merge outside tolerance). Exit 1."""

    exit_code = 1
