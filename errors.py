"""The exception types goose raises for the user: the CLI prints the message on one line and exits with
`exit_code` (2 for bad input, 1 for a run that failed on its own, e.g. training that kept diverging)."""


class GooseError(Exception):
    """A user-facing error: bad arguments, bad data, a store that does not match. Message is one line."""

    exit_code = 2


class RunFailed(GooseError):
    """The input was fine but the run could not finish (persistent non-finite losses): exit status 1."""

    exit_code = 1
