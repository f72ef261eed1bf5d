"""Measuring a link with real collectives: what ``link_gbit="measure"`` runs at setup and what
the pre-flight command (:mod:`lightning_gaussk.observe.preflight`) reports.

A link is fitted to timed all-gathers and all-reduces by the cost model's
:func:`~lightning_gaussk.costs.planning.fit_link` (alpha-beta: ``t = hops alpha + bytes beta``).
:func:`probe_repeats` measures it several times over, so that a caller can see the run-to-run
spread of the fit (the pre-flight decides at the pessimistic end of it).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from lightning_gaussk.costs import model as costmodel
from lightning_gaussk.costs.planning import Sample, fit_link
from lightning_gaussk.comm.exchange import all_gather

__all__ = ["fit", "measure_link", "median_seconds", "probe_repeats", "time_collectives"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Any, device: torch.device, reps: int = 3) -> float:
    """Median wall seconds of ``fn()`` over ``reps`` calls after one warm-up, the device
    synchronised around each (a measurement, never called in a training step)."""
    fn()
    _sync(device)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _group_max(x: float, group: Any, device: torch.device) -> float:
    t = torch.tensor([x], dtype=torch.float64 if device.type != "cuda" else torch.float32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t.item())


def time_collectives(group: Any, device: torch.device, max_bytes: int, *, min_bytes: int = 4096,
                     op_limit_s: float = 0.25, reps: int = 3,
                     kinds: Sequence[str] = ("allgather", "allreduce")) -> list[Sample]:  # fmt: skip
    """Time ``kinds`` of collectives in ``group`` (every member calls it, nobody else) at sizes
    ``min_bytes * 4^i`` up to ``max_bytes`` (fp32 messages per rank), median of ``reps`` after one
    warm-up; a size slower than ``op_limit_s`` is the last. Every member returns the same samples
    (the group's slowest time of each)."""
    world = dist.get_world_size(group)
    samples: list[Sample] = []
    if world < 2:
        return samples
    nbytes = max(4, min(min_bytes, max_bytes))
    while True:
        n = max(1, nbytes // 4)
        x = torch.ones(n, dtype=torch.float32, device=device)
        out = torch.empty(world * n, dtype=torch.float32, device=device)
        slowest = 0.0
        for kind in kinds:
            def op() -> None:
                if kind == "allgather":
                    all_gather(out, x, group=group)
                else:
                    dist.all_reduce(x, group=group)

            t = _group_max(median_seconds(op, device, reps), group, device)
            samples.append(Sample(kind, world, 4 * n, t))
            slowest = max(slowest, t)
        if 4 * n >= max_bytes or slowest > op_limit_s:
            return samples
        nbytes = min(nbytes * 4, max_bytes)


def fit(samples: Sequence[Sample], small_bytes: int = 16384) -> costmodel.Link | None:
    """The link behind timed collectives (None without samples).

    Each kind (all-gather, all-reduce) is fitted on its own by
    :func:`~lightning_gaussk.costs.planning.fit_link`, and the faster fit is the link: a collective
    whose implementation does not reach the wire's rate (gloo's all-gather of large messages on a
    busy host) says something about that implementation, not about the link. When the fit pins
    the latency to 0 (a token-bucket shaper lets the first burst through at once, which pulls the
    intercept below zero), ``alpha`` is the median of ``(seconds - bytes * beta) / hops`` over
    the messages of at most ``small_bytes``."""
    fits = []
    for kind in sorted({s.kind for s in samples}):
        mine = [s for s in samples if s.kind == kind]
        try:
            fits.append((fit_link(mine), mine))
        except ValueError:
            big = max(mine, key=lambda s: s.features()[1])
            if big.features()[1] > 0:
                fits.append((costmodel.Link(alpha=0.0, bandwidth=big.features()[1] / big.seconds), mine))
    if not fits:
        return None
    link, mine = max(fits, key=lambda f: f[0].bandwidth)
    if link.alpha == 0.0:
        rest = sorted(max(0.0, (s.seconds - s.features()[1] * link.beta) / s.features()[0]) for s in mine if s.nbytes <= small_bytes)
        if rest:
            link = costmodel.Link(alpha=statistics.median(rest), bandwidth=link.bandwidth)
    return link


def probe_repeats(group: Any, device: torch.device, max_bytes: int, repeats: int = 3, *, op_limit_s: float = 0.25,
                  reps: int = 3) -> list[tuple[list[Sample], costmodel.Link | None]]:  # fmt: skip
    """``repeats`` independent measurements of the link behind ``group`` (every member calls it,
    nobody else): each a whole :func:`time_collectives` sweep and its :func:`fit`. The fits of a
    busy or shared link differ from sweep to sweep; their spread is the uncertainty of the figure.
    Every member returns the same samples and fits."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"probe_repeats: repeats must be an int >= 1, got {repeats!r}")
    out = []
    for _ in range(repeats):
        samples = time_collectives(group, device, max_bytes, op_limit_s=op_limit_s, reps=reps)
        out.append((samples, fit(samples)))
    return out


def _groups(topology: Any) -> tuple[Any, bool, Any, bool]:
    """(intra group, this rank measures it, inter group, this rank measures it) of a topology:
    node mode: node 0's ranks inside their node, local rank 0 of every node between nodes; flat
    with one node (``L == W``): the world is intra; flat otherwise: every rank is a node."""
    layout = topology.layout
    if layout.mode == "node":
        return topology.intra, layout.node == 0, topology.route.group, layout.local_rank == 0
    return None, False, topology.route.group, True


def _device_of(group: Any) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def measure_link(topology: Any, max_bytes: int = 16 * 2**20, op_limit_s: float = 0.25,
                 device: torch.device | None = None, src: int = 0) -> costmodel.Link | None:  # fmt: skip
    """The link the exchange runs on, measured once on every rank of ``topology``'s world and
    agreed: node mode's inter-node groups (local rank 0's only), or the flat group; rank ``src``'s
    fit is broadcast so that every rank returns the same :class:`~lightning_gaussk.costs.model.Link`
    (None with one rank, or one node). What ``link_gbit="measure"`` runs at setup."""
    layout = topology.layout
    group = topology.route.group
    world_group = group if layout.mode == "flat" else None
    if dist.get_world_size(world_group) < 2 or (layout.mode == "node" and layout.nodes < 2):
        return None
    device = _device_of(world_group) if device is None else device
    _, _, inter, measures = _groups(topology)
    link = fit(time_collectives(inter, device, max_bytes, op_limit_s=op_limit_s)) if measures else None
    t = torch.tensor([link.alpha, link.bandwidth] if link else [0.0, 0.0], dtype=torch.float64, device=device)
    if device.type == "cuda":
        t = t.float()
    dist.broadcast(t, src=dist.get_global_rank(world_group, src) if world_group is not None else src, group=world_group)
    alpha, bandwidth = (float(v) for v in t.tolist())
    return costmodel.Link(alpha=max(alpha, 0.0), bandwidth=bandwidth) if bandwidth > 0 else None
