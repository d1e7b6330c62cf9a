"""The one exception type every command turns into a one-line error and exit code 2."""


class HermesError(Exception):
    """A problem the user can fix: bad arguments, unknown destination, missing spool."""
