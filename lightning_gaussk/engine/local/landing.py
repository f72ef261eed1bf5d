"""An outer exchange in flight, and where it lands: the overlapped outer step (``overlap_steps = tau``).

Fragment ``f`` launches its exchange after optimizer step ``t0`` and keeps training; the update
lands after step ``t0 + tau``, on every rank at the same step. With ``x_r(t)`` rank ``r``'s
parameters and ``theta`` the global model::

    launch (t0)     snapshot_r = x_r(t0),  Delta_r = theta - snapshot_r,  select and issue the exchange
    finish          wait; theta' = outer step of theta on the mean update; e_r = u_r - sent_r
    land (t0+tau)   x_r := theta' + (x_r(t0 + tau) - snapshot_r)

so each rank's model is the new ``theta`` plus its own progress since the launch, and that progress
is counted once, in the next pseudo-gradient (``theta' - x_r`` at the next launch). With ``tau = 0``
the progress is zero and the step is the blocking one (the driver then copies ``theta`` as before).

A non-finite pseudo-gradient on any rank skips the update on every rank (``theta``, ``e`` and the
outer momentum kept): a rank lands on ``theta`` plus its progress, and the rank whose own
``Delta`` was non-finite lands on ``theta`` with its inner optimizer's state reset.

``finish`` may run early, at a checkpoint (it is a collective, issued by every rank at the same
save): ``theta`` and ``e`` are then committed, and the landing, with the snapshot, is recorded and
saved (:meth:`InFlight.to_state`), so a resume lands at ``t0 + tau`` exactly as the uninterrupted
run does.

Time: ``hidden`` is the exchange's time before the landing (from the launch to its completion,
observed by polling at each optimizer step, or to the landing if it was still running); ``exposed``
is the host's time at the landing: the wait for the exchange, its decode and the commit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from lightning_gaussk.engine.local.exchange import PendingSync

__all__ = ["InFlight", "is_done"]


def is_done(work: Any) -> bool:
    """Whether a collective's work (``dist.Work``, or a ``torch.futures.Future``) is complete,
    without waiting (on CUDA, ``is_completed`` queries the work's event: no host synchronisation)."""
    probe = getattr(work, "is_completed", None)
    return bool(probe() if probe is not None else work.done())


@dataclass
class InFlight:
    """Fragment ``index``'s outer step between its launch and its landing.

    ``land_at``: the optimizer step after which it lands; ``number``: its outer step's number (for
    messages); ``pending``: the exchange (None once finished); ``overlapped``: False for a blocking
    sync (it lands where it launched); ``own_ok`` / ``ok``: whether this rank's / every rank's
    pseudo-gradient was finite (known once finished)."""

    index: int
    land_at: int
    number: int
    pending: PendingSync | None
    overlapped: bool = True
    launched_ns: int = 0
    completed_ns: int | None = None
    own_ok: bool = True
    ok: bool = True

    @property
    def finished(self) -> bool:
        return self.pending is None

    def observe(self) -> None:
        """Note the time the exchange is first seen complete (telemetry; no wait)."""
        if self.pending is not None and self.completed_ns is None and is_done(self.pending.launched.work):
            self.completed_ns = time.perf_counter_ns()

    def hidden_ns(self, now: int) -> int:
        """The exchange's time before ``now`` (the landing, or an early finish)."""
        end = self.completed_ns if self.completed_ns is not None else now
        return max(0, end - self.launched_ns)

    def to_state(self) -> dict[str, Any]:
        """The landing still owed, once finished (plain values; the snapshot is saved by the driver)."""
        assert self.finished, "finish the exchange before saving its landing"
        return {"fragment": self.index, "land_at": self.land_at, "number": self.number, "own_ok": self.own_ok, "ok": self.ok}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> InFlight:
        """A finished landing from :meth:`to_state`."""
        return cls(
            int(state["fragment"]), int(state["land_at"]), int(state["number"]), None,
            own_ok=bool(state["own_ok"]), ok=bool(state["ok"]),
        )  # fmt: skip
