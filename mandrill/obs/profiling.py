"""``--profile FILE``: cProfile around the whole run, stats written at exit.

Both backends run every task on one thread, so a profiler enabled around ``anyio.run``
sees all of the service's own work. Threads are not profiled (``to_thread`` workers such
as the SQLite ledger's, the log writer). A coroutine's frame is entered and left at each
resume and suspension, so ``tottime`` is time on the CPU, not time spent waiting.

Reading the file::

    python -m pstats FILE                      # then: sort cumtime / stats 30
    python -c "import pstats; pstats.Stats('FILE').sort_stats('cumtime').print_stats(30)"
    pyprof2calltree -i FILE -k                 # convert and open in KCachegrind
    snakeviz FILE                              # in a browser

For one hot function line by line, ``line_profiler`` (``@profile`` + ``kernprof -l``);
for a low-overhead sampling view that groups by ``await``, ``pyinstrument
--async-mode=strict`` (asyncio) or ``py-spy record -o out.svg --pid PID`` (any backend,
no restart needed).
"""

from __future__ import annotations

import cProfile
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


@contextmanager
def profiled(path: str | os.PathLike[str] | None) -> Iterator[cProfile.Profile | None]:
    """Profile the block with cProfile and write ``pstats`` data to ``path`` on exit.

    Does nothing when ``path`` is ``None``. The file is created at entry, so an
    unwritable path raises ``OSError`` before anything runs; the stats are written
    however the block ends (an error writing them then is logged, not raised, so it
    cannot hide the block's own exception). Profiling slows the program down 1.5 to 3 times.
    """
    if path is None:
        yield None
        return
    with open(path, "wb"):
        pass
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        yield profiler
    finally:
        profiler.disable()
        try:
            profiler.dump_stats(path)
        except OSError as exc:
            log.error("could not write the profile to %s: %s", path, exc)
        else:
            log.info("profile written to %s (view: pyprof2calltree -i %s -k)", path, path)
