"""When to sync: every ``H`` optimizer steps, fragment ``f`` of ``F`` at its offset.

After optimizer step ``t`` (counted from 1), fragment ``f`` syncs when::

    t mod H == offset(f),      offset(f) = (f * H) // F

so ``F`` fragments spread their outer steps evenly over a window of ``H`` steps (torchft's
streaming DiLoCo). With ``F = 1`` (today) the one fragment syncs after steps ``H, 2H, ...``
(torch's ``PeriodicModelAverager`` without warm-up).
"""

from __future__ import annotations

__all__ = ["SyncSchedule"]


class SyncSchedule:
    """The sync points of ``fragments`` fragments with a period of ``every`` optimizer steps.

    Args:
        every: ``H``, optimizer steps between two syncs of a fragment (>= 1).
        fragments: ``F``, the fragments (``1 <= F <= H``: each gets its own offset).

    Raises:
        ValueError: naming the argument.

    Example::

        schedule = SyncSchedule(every=16)
        schedule.due(32)        # (0,): fragment 0 syncs after optimizer step 32
        schedule.position(35)   # 3 steps into the window
    """

    def __init__(self, every: int, fragments: int = 1) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"SyncSchedule: `every` must be an int >= 1, got {every!r}")
        if isinstance(fragments, bool) or not isinstance(fragments, int) or not 1 <= fragments <= every:
            raise ValueError(f"SyncSchedule: `fragments` must be an int in [1, every] = [1, {every}], got {fragments!r}")
        self.every, self.fragments = every, fragments
        due: list[list[int]] = [[] for _ in range(every)]
        for f in range(fragments):
            due[self.offset(f)].append(f)
        self._due = tuple(tuple(fs) for fs in due)  # by t mod H: built once, read every step

    def offset(self, fragment: int) -> int:
        """The step of the window (``t mod H``) after which ``fragment`` syncs."""
        return (fragment * self.every) // self.fragments

    def due(self, step: int) -> tuple[int, ...]:
        """The fragments that sync after optimizer step ``step`` (counted from 1), in order."""
        return self._due[step % self.every]

    def position(self, step: int) -> int:
        """Optimizer steps taken into the current window after ``step`` steps (0 at a sync of fragment 0)."""
        return step % self.every
