"""Communication callbacks still held by torch's threads, and waiting for them (teardown safety).

torch's communication thread releases a ``.then()`` callback just *after* the future the hook
returned is complete, and it needs the GIL to do so. A process that tears down right then
(interpreter exit, or a gloo group destroyed while the GIL is held) aborts with "terminate called
without an active exception" or deadlocks. Each callback holds a :class:`Pending` token as a
default argument; :func:`wait_idle` waits until every token of an owner is released. It runs at
exit for every live owner, and in the integrations' teardown.

A second hazard: the callback's references (the hook state, its route, the process group) may be
the last ones once the script has dropped its model and called ``destroy_process_group()``. The
communication thread would then destroy the group it belongs to, joining itself ("terminate called
after throwing an instance of 'std::system_error': Resource deadlock avoided"; seen in CI with a
subgroup). So a released token never lets its owner die on that thread: it hands the owner to
:data:`_RELEASED`, emptied by the hook's own thread at the next token, by :func:`wait_idle`, and at
exit (:func:`drain`), where dropping the group joins its threads from outside.
"""

from __future__ import annotations

import atexit
import threading
import time
import weakref
from typing import Any

__all__ = ["Pending", "destroy_group_at_exit", "drain", "wait_idle"]

_LIVE: "weakref.WeakSet[Any]" = weakref.WeakSet()  # owners whose callbacks may not be released yet
_LOCK = threading.RLock()  # re-entrant: a finalizer run by the collector on a thread that holds it
_RELEASED: list[Any] = []  # owners of released tokens, dropped later from a thread that is not the group's


def _bury() -> None:
    """Drop the owners that released tokens handed over (from the hook's or the main thread)."""
    global _RELEASED
    fresh: list[Any] = []  # allocated outside the lock (an allocation may run the garbage collector)
    with _LOCK:
        owners, _RELEASED = _RELEASED, fresh
    del owners  # the last references may go here, outside the lock and outside a communication thread


class Pending:
    """Lives exactly as long as one communication callback of ``owner`` (counted in ``owner._inflight``)."""

    __slots__ = ("owner",)

    def __init__(self, owner: Any) -> None:
        if _RELEASED:
            _bury()
        self.owner = owner
        with _LOCK:
            owner._inflight = getattr(owner, "_inflight", 0) + 1
        _LIVE.add(owner)

    def __del__(self) -> None:
        with _LOCK:
            self.owner._inflight -= 1
            _RELEASED.append(self.owner)  # not the last reference: this may be a communication thread


def wait_idle(owner: Any, timeout: float = 5.0) -> bool:
    """Wait until every callback of ``owner`` is released; False if ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    while getattr(owner, "_inflight", 0) > 0:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)  # releases the GIL, so the communication thread can finish
    _bury()
    return True


def drain(timeout: float = 2.0) -> None:
    """Wait for the callbacks of every live owner (``timeout`` seconds each at most)."""
    for owner in list(_LIVE):
        wait_idle(owner, timeout=timeout)
    _bury()


atexit.register(drain)

_DESTROY_REGISTERED = False


def destroy_group_at_exit() -> None:
    """Once per process: at interpreter exit, while Python still runs, wait for the callbacks of
    every live owner (:func:`drain`), then destroy the default process group, so gloo's threads
    are joined in order. Lightning does this for NCCL groups only, and Accelerate only in
    ``end_training()``; left to the interpreter's finalization, a gloo group's teardown can race
    its threads and abort the process with "terminate called without an active exception" (seen
    in CI: a finished fit, then exit status -6). Local: no collective. Every integration
    (the Lightning strategies, ``register_gaussk``) calls this when it sets up."""
    global _DESTROY_REGISTERED
    if not _DESTROY_REGISTERED:
        atexit.register(_destroy_at_exit)
        _DESTROY_REGISTERED = True


def _destroy_at_exit() -> None:
    import torch.distributed as dist

    drain(timeout=2.0)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
