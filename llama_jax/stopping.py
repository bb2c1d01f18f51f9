"""When a run stops on a signal: SIGTERM (a scheduler's preemption notice) or a first Ctrl-C
ends training with a checkpoint of the step reached; a second Ctrl-C interrupts at once.

The processes of a multi-process run must stop at the same step, since the save is a
collective: a process that saved while its peers stepped on would wait for them forever (found
in session 23: a SIGTERM to one of two processes hung both until the hang watchdog ended them,
with no checkpoint). Schedulers do not signal every host at the same step, and some signal only
one. So there SIGTERM is left to JAX's preemption service (`jax.distributed` installs it with
the coordination service): it catches the signal on any process, tells the others, and they
agree on the first step every one of them can still reach, which
`multihost_utils.reached_preemption_sync_point` then reports on all of them (MaxText and Orbax
stop the same way). A Ctrl-C there is passed on as a SIGTERM to this process, so it goes the
same way. A single process keeps the plain flag.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import jax

from llama_jax.errors import LlamaJaxError


class Preempted(LlamaJaxError):
    """The run stopped on a signal after saving a checkpoint of the current step."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def _preemption_service() -> bool:
    """Whether JAX's preemption service runs here (a multi-process run with it enabled)."""
    if jax.process_count() <= 1:
        return False
    try:  # the service's handle has no public accessor
        from jax._src import distributed

        return distributed.global_state.preemption_sync_manager is not None
    except (ImportError, AttributeError):  # moved in a later JAX: then its switch says
        return bool(getattr(jax.config, "jax_enable_preemption_service", True))


class StopSignals:
    """Signals turned into a decision the loop asks for once per step (`due`), on every
    process at the same point, so that a multi-process run agrees on where to stop."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict[int, Any] = {}
        self.shared = _preemption_service()

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            # Under the preemption service SIGTERM stays with it: a Python handler would
            # replace its own (and restoring SIG_DFL afterwards would remove it).
            signals = (signal.SIGINT,) if self.shared else (signal.SIGTERM, signal.SIGINT)
            self.previous = {s: signal.signal(s, self._handle) for s in signals}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        if self.shared:
            os.kill(os.getpid(), signal.SIGTERM)  # to the preemption service's handler

    def due(self, step: int) -> bool:
        """Whether to save `step` and stop. Call it once per step, on every process."""
        if not self.shared:
            return self.received is not None
        from jax.experimental import multihost_utils

        if not multihost_utils.reached_preemption_sync_point(step):
            return False
        self.received = self.received or signal.SIGTERM  # a peer's notice
        return True

    def stopped(self, step: int, where: Any) -> Preempted:
        name = signal.Signals(self.received).name
        if self.shared and self.received == signal.SIGTERM:
            name += f" to one of the {jax.process_count()} processes"
        return Preempted(f"stopped by {name} after step {step}; checkpoint saved in {where}",
                         128 + int(self.received))

    def __exit__(self, *exc: object) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
