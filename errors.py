"""The one exception type goose raises for bad input: the CLI prints its message on one line and exits 2."""


class GooseError(Exception):
    """A user-facing error: bad arguments, bad data, a store that does not match. Message is one line."""
