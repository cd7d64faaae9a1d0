"""Drawing on worker processes, in task order (the embedded benchmark's and corpus's images), and the
generators' parameter checks."""
from __future__ import annotations

import contextlib
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterator, Sequence, TypeVar

import numpy as np
from tqdm import tqdm

from bench.errors import BenchError


# --------------------------------------------------------------------------- parallel drawing

_Task = TypeVar("_Task")
_Result = TypeVar("_Result")


def _imap(function: Callable[[_Task], _Result], tasks: Sequence[_Task], workers: int, progress: bool,
          desc: str) -> Iterator[_Result]:
    """``map(function, tasks)`` in task order, on ``workers`` spawned processes (in this one when 1).

    A ``concurrent.futures`` process pool rather than ``multiprocessing.Pool``, which restarts
    workers that die at start-up forever (a hang) where this one fails at once.
    """
    with contextlib.ExitStack() as stack:
        if workers > 1:
            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
            stack.callback(pool.shutdown, cancel_futures=True)
            results = pool.map(function, tasks, chunksize=max(1, min(256, len(tasks) // (8 * workers))))
        else:
            results = map(function, tasks)
        try:
            yield from tqdm(results, total=len(tasks), desc=desc, unit="img", disable=not progress, leave=False)
        except BrokenProcessPool as err:
            raise BenchError(f"embedded generator: a worker process died ({err}); if the caller is a script, "
                             f"guard it with `if __name__ == '__main__':`, or use workers=1") from None


def _integer(name: str, value: object, minimum: int) -> int:
    """``value`` as an int; BenchError naming the parameter unless it is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise BenchError(f"embedded generator: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)
