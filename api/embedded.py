"""The embedded executor under `sgtm serve`, kept running: when it dies it is started again.

An executor can die under the API that feeds it (the kernel's OOM killer, a crash in a native library). Without a
keeper the API would go on accepting jobs that nothing runs. The new executor requeues the job the old one left
running (it holds the data root's lock, so every `running` job is an orphan), and that job resumes from its
checkpoint; the old executor's engine child stops itself when its stdin lifeline closes, and the new attempt waits
for its workdir lock until it has.

An executor that exits cleanly (exit code 0) was asked to stop and stays stopped. A crash loop is not hidden: each
exit is logged with its code, restarts back off (1, 2, 4 … 30 s), and after `max_restarts` exits within `window_s`
the keeper stops trying. /ready then reports the executor as not running.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence

log = logging.getLogger(__name__)


class ExecutorKeeper:
    def __init__(self, argv: Sequence[str], env: Mapping[str, str], *, max_restarts: int = 5,
                 window_s: float = 300.0, poll_s: float = 0.5):
        self.argv, self.env = list(argv), dict(env)
        self.max_restarts, self.window_s, self.poll_s = max_restarts, window_s, poll_s
        self.starts = 0
        self.gave_up = False
        self._exits: list[float] = []
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # the process is replaced by the watcher and stopped by the caller
        self._proc: subprocess.Popen[bytes] | None = None
        self._watcher = threading.Thread(target=self._watch, name="executor-keeper", daemon=True)

    @property
    def pid(self) -> int | None:
        with self._lock:
            return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def start(self) -> None:
        self._spawn()
        self._watcher.start()

    def stop(self, grace_s: float) -> None:
        """No more restarts; SIGTERM the executor (its running job checkpoints and is requeued for the next start),
        SIGKILL after `grace_s`."""
        self._stopping.set()
        if self._watcher.is_alive():
            self._watcher.join()
        with self._lock:
            proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdin is not None:
            proc.stdin.close()

    def _spawn(self) -> None:
        with self._lock:
            if self._proc is not None and self._proc.stdin is not None:
                self._proc.stdin.close()  # the exited executor's lifeline
            # stdin: the executor's lifeline (`--stdin-lifeline`), open for as long as we live
            self._proc = subprocess.Popen(self.argv, env=self.env, stdin=subprocess.PIPE)
            self.starts += 1

    def _watch(self) -> None:
        while not self._stopping.wait(self.poll_s):
            with self._lock:
                code = self._proc.poll() if self._proc is not None else None
            if code is None:
                continue
            if code == 0:  # it stopped as asked: Ctrl-C in the terminal reaches it as well as `sgtm serve`
                log.info("the executor stopped")
                return
            now = time.monotonic()
            self._exits = [t for t in self._exits if now - t < self.window_s] + [now]
            if len(self._exits) > self.max_restarts:
                log.error("the executor exited %d times within %.0f s (last exit code %s); not starting it again. "
                          "Queued jobs wait until `sgtm serve` is restarted", len(self._exits), self.window_s, code)
                self.gave_up = True
                return
            delay = min(2.0 ** (len(self._exits) - 1), 30.0)
            log.warning("the executor exited with code %s; starting it again in %.0f s", code, delay)
            if self._stopping.wait(delay):
                return
            self._spawn()
