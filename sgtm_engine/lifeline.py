"""A parent's lifeline on stdin: a child process learns that its parent is gone, however the parent died.

The parent starts the child with a pipe as stdin and never writes to it. The kernel closes the parent's end when the
parent exits for any reason (a clean exit, kill -9, the OOM killer), and the child then reads end of file. Unlike
Linux's parent-death signal this needs no `prctl`, works on every POSIX system, follows the parent process rather
than the thread that spawned the child, and reaches through launchers that pass stdin on (torchrun's workers inherit
it). The end of file comes once every process holding the pipe's write end has exited: the parent's own helpers
started through `subprocess` do not hold it (its pipes are close-on-exec), but a helper it forks without exec and
that outlives it would. Stdlib only: the service's worker imports it too.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable


def watch_stdin(on_close: Callable[[], None]) -> threading.Thread:
    """Call `on_close` from a daemon thread once stdin reaches end of file (or cannot be read); returns the thread.
    Whatever arrives on stdin before that is read and ignored."""
    def watch() -> None:
        try:
            while os.read(0, 4096):
                pass
        except OSError:  # a closed or invalid stdin: nobody holds the other end
            pass
        on_close()

    thread = threading.Thread(target=watch, name="stdin-lifeline", daemon=True)
    thread.start()
    return thread
