"""What every popen-launched Lightning test script does around its fits.

Lightning's popen launcher re-runs the script for the other local ranks, so the process that
pytest started is local rank 0 of its node and the others are its children:

- :class:`Children` keeps the launcher's processes of the first fit, and :meth:`Children.finish`
  waits for them and exits with status 3 if any did not exit with 0 (an abort at teardown, e.g.
  "terminate called without an active exception", would otherwise go unseen);
- :func:`record_group_at_exit` writes, at interpreter exit, whether the process group was still
  initialised, to ``<out>/exit/<pid>.txt``. Registered before any strategy exists, it runs after
  the strategy's own exit handler (``atexit`` is LIFO): ``False`` means the strategy destroyed the
  gloo group while Python still ran.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
from typing import Any

import torch.distributed as dist


class Children:
    """The popen launcher's child processes (local rank 0 only; empty elsewhere and under spawn)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def collect(self, trainer: Any) -> None:
        """Keep the launcher's processes of ``trainer``, once (later fits reuse the same processes)."""
        if not self.procs:
            launcher = getattr(trainer.strategy, "_launcher", None)
            self.procs.extend(p for p in getattr(launcher, "procs", []) if isinstance(p, subprocess.Popen))

    def finish(self, name: str) -> None:
        """Wait for every child; exit with 3 unless all exited with 0."""
        if self.procs:
            codes = [proc.wait(timeout=120) for proc in self.procs]
            print(f"{name}: child exit codes {codes}", flush=True)
            if any(codes):
                sys.exit(3)


def record_group_at_exit(out: str) -> None:
    """At exit, write whether the default process group was still initialised (see the module doc)."""
    folder = os.path.join(out, "exit")

    def record() -> None:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{os.getpid()}.txt"), "w") as f:
            f.write(str(dist.is_available() and dist.is_initialized()))

    atexit.register(record)


def groups_at_exit(out: str) -> list[str]:
    """What :func:`record_group_at_exit` wrote, one entry per process."""
    folder = os.path.join(out, "exit")
    return [open(os.path.join(folder, f)).read() for f in sorted(os.listdir(folder))] if os.path.isdir(folder) else []
