"""Errors that the CLI reports as one clean line (no traceback unless --debug)."""


class AllocMoeError(Exception):
    """A user-facing error: bad input, a mismatched plan, a missing runtime."""
