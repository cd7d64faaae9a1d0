"""User-facing errors: one line, naming the problem and the fix."""


class BenchError(Exception):
    """An error the CLI prints as one line (no traceback) before exiting non-zero.

    The message should name the file or key at fault and say how to fix it.
    """
