"""User-facing errors: one line, naming the problem and the fix."""


class BenchError(Exception):
    """An error the CLI prints as one line (no traceback) before exiting non-zero.

    The message should name the file or key at fault and say how to fix it.
    """

    _WORKER_PREFIX = "Caught BenchError in DataLoader worker"

    def __init__(self, message: object = "", *args: object):
        # A BenchError raised in a DataLoader worker is re-raised by the DataLoader as BenchError("Caught
        # BenchError in DataLoader worker process N.\nOriginal Traceback ...\nbench.errors.BenchError: <message>"):
        # keep only <message>, so that the error stays one line wherever it is printed.
        if isinstance(message, str) and message.startswith(self._WORKER_PREFIX):
            marker = f"{type(self).__module__}.{type(self).__qualname__}: "
            message = message.rstrip("\n").rpartition(marker)[2] or message
        super().__init__(message, *args)
