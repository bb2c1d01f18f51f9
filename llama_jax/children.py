"""Child processes that end with the command that started them.

`launch` starts the processes of a job, `sweep` and `plan` a `bench` per layout. When the
parent ends, even by SIGKILL or a scheduler's SIGTERM to it alone, a child left running would
train on unattended with the run's lock, or hold the accelerator (libtpu admits one process
per host) that the next job needs. So each child asks Linux for a signal when its parent dies
(`PR_SET_PDEATHSIG`): SIGTERM under `launch` (`train` saves and stops as on a preemption
notice), SIGKILL for `sweep`'s and `plan`'s measurements. The request is made in the child's
own start-up rather than in `preexec_fn`, which is unsafe in a parent that runs threads (JAX's
do).
"""

from __future__ import annotations

import os
import sys

ENV_PARENT = "LLAMA_JAX_PARENT"  # "PID:SIGNAL"
_PR_SET_PDEATHSIG = 1


def child_environment(on_parent_death: int, env: dict[str, str] | None = None
                      ) -> dict[str, str]:
    """`env` (default: this process's) for a child that gets `on_parent_death` when this
    process dies: SIGTERM for `train` (it saves and stops), SIGKILL for a measurement with
    nothing to keep (in a multi-process job JAX's preemption service takes SIGTERM, so a
    `bench` would not end on it)."""
    return {**(os.environ if env is None else env),
            ENV_PARENT: f"{os.getpid()}:{int(on_parent_death)}"}


def end_with_parent() -> None:
    """In a child started with `child_environment`, first thing: the signal it asked for when
    its parent dies. Linux only; elsewhere nothing changes."""
    parent, _, signum = os.environ.pop(ENV_PARENT, "").partition(":")
    if not parent or not sys.platform.startswith("linux"):
        return  # (popped: not passed on to this process's own children)
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signum))
    if os.getppid() != int(parent):  # it died before the request was in place
        os.kill(os.getpid(), int(signum))
