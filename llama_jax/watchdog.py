"""The hang watchdog: a run that stops making progress ends, with a report, so that a
scheduler can restart it.

A collective that never returns (a stopped or wedged peer) blocks the training loop forever
without an error; so can a checkpoint write to a stalled filesystem. The loop tells the
watchdog what it is doing at every turn (`doing`); a thread checks that the same thing has
not lasted longer than `train.step_timeout_s`. If it has, each process writes
`RUN_DIR/hang-<process>.txt` (every Python thread's stack, the step, what it was doing, for
how long), prints one line naming the file, and exits at once with `HANG_EXIT_CODE`. It exits
with `os._exit`: the blocked thread cannot be unwound, and nothing may be half written after
it: a checkpoint being saved is left as Orbax's temporary folder, which restoring skips.

The limit, unless set: 20 times the median step time once steps have been timed, never under
10 minutes. The first run of a program in a session (the first train step, the first
evaluation) compiles it, so it gets at least `COMPILE_S`, whatever the limit.
"""

from __future__ import annotations

import os
import socket
import statistics
import sys
import threading
import time
import traceback
from collections import deque

from etils import epath

HANG_EXIT_CODE = 114  # neither an error (1, 2) nor a signal (128 + n): "restart me"
AUTO_FLOOR_S = 600.0
AUTO_STEPS = 20.0
COMPILE_S = 1800.0


class Watchdog:
    """`with Watchdog(...) as dog:` then `dog.doing(step, what)` at each change of activity;
    nothing is watched before the first `doing` (preparing data may take as long as it
    needs)."""

    def __init__(self, run_dir: epath.Path, process: int, timeout_s: float | None,
                 poll_s: float = 1.0):
        self.path = run_dir / f"hang-{process}.txt"
        self.process = process
        self.setting = timeout_s  # None: automatic; 0: off
        self.poll_s = poll_s
        self.step_times: deque[float] = deque(maxlen=50)
        self._lock = threading.Lock()
        self._state: tuple[int, str, float, bool] | None = None  # not watching yet
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.setting != 0

    def limit(self, compiling: bool = False) -> float:
        if self.setting:
            base = float(self.setting)
        elif self.step_times:
            base = max(AUTO_FLOOR_S, AUTO_STEPS * statistics.median(self.step_times))
        else:
            base = AUTO_FLOOR_S
        return max(base, COMPILE_S) if compiling else base

    def observed(self, step_time_s: float | None) -> None:
        """A measured time per step (from a log row), for the automatic limit."""
        if step_time_s:
            self.step_times.append(step_time_s)

    def doing(self, step: int, what: str, compiling: bool = False) -> None:
        with self._lock:
            self._state = (step, what, time.monotonic(), compiling)

    def __enter__(self) -> Watchdog:
        if self.enabled:
            self._thread = threading.Thread(target=self._watch, name="llama_jax-watchdog",
                                            daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            with self._lock:
                if self._state is None:
                    continue
                step, what, since, compiling = self._state
            limit = self.limit(compiling)
            stuck = time.monotonic() - since
            if stuck > limit:
                self._fire(step, what, stuck, limit)

    def _fire(self, step: int, what: str, stuck: float, limit: float) -> None:
        """Report and leave; never returns."""
        setting = "auto" if self.setting is None else f"{self.setting:g}"
        head = (f"{what} at step {step} made no progress for {stuck:.0f} s (limit {limit:.0f} s, "
                f"train.step_timeout_s={setting})")
        try:
            self.path.write_text(report(head, self.process))
            where = f"thread stacks in {self.path}"
        except Exception as e:  # noqa: BLE001 - the exit must happen whatever the storage does
            where = f"could not write {self.path} ({e})"
            sys.stderr.write(report(head, self.process))
        sys.stderr.write(f"llama-jax: error: hang: {head}; {where}; exiting with status "
                         f"{HANG_EXIT_CODE} so the job can be restarted\n")
        sys.stderr.flush()
        os._exit(HANG_EXIT_CODE)


def report(head: str, process: int) -> str:
    """What each Python thread of this process is doing, the blocked main thread first."""
    names = {t.ident: t.name for t in threading.enumerate()}
    frames = sorted(sys._current_frames().items(),
                    key=lambda item: item[0] != threading.main_thread().ident)
    lines = [f"llama_jax hang report: {head}",
             f"process {process}, pid {os.getpid()}, host {socket.gethostname()}, "
             f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}", ""]
    for ident, frame in frames:
        lines.append(f"--- thread {names.get(ident, '?')} ({ident})")
        lines += [line.rstrip("\n") for line in traceback.format_stack(frame)]
        lines.append("")
    return "\n".join(lines) + "\n"
