"""Stage times of the pipeline, on the host for CPU tensors and with CUDA events on a GPU.

On CPU a mark is ``time.perf_counter_ns()`` and the spans are added to the counters at once. On a
GPU a mark is a CUDA event recorded on the current stream: nothing is read in the step (no host
sync). The spans wait in the state until :func:`fold` finds their events complete (a non-blocking
``Event.query()``) and adds ``elapsed_time`` to the same counters; the telemetry callback folds
before it reads the counters, and every pass folds what is ready before it records new events.
Each slot keeps its event sets and reuses a set once its spans are folded, so the step allocates
no events once the device keeps pace.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch

__all__ = ["StageClock", "fold"]

# communication callbacks may complete on a backend thread: counter updates take this lock
LOCK = threading.Lock()


class _EventSet:
    """CUDA events of one pass of one slot; ``busy`` until its spans are folded."""

    __slots__ = ("busy", "events")

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.busy = True


class StageClock:
    """Marks of one pass of one slot: ``mark()`` returns the mark's index; :meth:`spans` turns
    pairs of marks into counter increments (``spans([("select_ns", 1, 2), ...])``)."""

    def __init__(self, state: Any, slot: Any, device: torch.device) -> None:
        self.state = state
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []
        if self.cuda:
            fold(state)
            sets: list[_EventSet] = slot.__dict__.setdefault("event_sets", [])
            free = next((e for e in sets if not e.busy), None)
            if free is None:  # the device is behind by more passes than there are sets
                free = _EventSet()
                sets.append(free)
            free.busy = True
            self.set = free

    def mark(self) -> int:
        i = len(self.marks)
        if self.cuda:
            events = self.set.events
            if i == len(events):
                events.append(torch.cuda.Event(enable_timing=True))
            events[i].record()
            self.marks.append(events[i])
        else:
            self.marks.append(time.perf_counter_ns())
        return i

    def spans(self, spans: list[tuple[str, int, int]]) -> None:
        """Add the time from mark ``a`` to mark ``b`` to counter ``name``, for each
        ``(name, a, b)`` (on a GPU: once :func:`fold` finds the events complete)."""
        with LOCK:
            if not self.cuda:
                for name, a, b in spans:
                    self.state.telemetry[name] += self.marks[b] - self.marks[a]
                return
            pending = self.state.__dict__.setdefault("_device_spans", [])
            pending.append((self.set, [(name, self.marks[a], self.marks[b]) for name, a, b in spans]))


def fold(state: Any) -> None:
    """Add the device spans whose events are complete to ``state.telemetry`` (no host sync: an
    incomplete span waits for a later call). The telemetry callback calls it before reading."""
    with LOCK:
        pending = state.__dict__.get("_device_spans")
        if not pending:
            return
        keep = []
        for event_set, spans in pending:
            if all(end.query() for _, _, end in spans):
                for name, start, end in spans:
                    state.telemetry[name] += int(start.elapsed_time(end) * 1e6)  # ms -> ns
                event_set.busy = False
            else:
                keep.append((event_set, spans))
        pending[:] = keep
