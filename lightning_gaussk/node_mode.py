"""Node mode of :func:`~lightning_gaussk.gaussk_hook`: dense inside a node, sparse between nodes.

``W = N L`` ranks, ``N`` nodes of ``L`` ranks (node-contiguous, see
:mod:`lightning_gaussk.topology`). One bucket of ``d`` entries, on local rank ``l``:

1. **Chunk order.** Each parameter of ``n_p`` entries is cut into ``L`` chunks of
   ``c_p = ceil(n_p / L)`` (the last ones shorter or empty) and the bucket is laid out as
   ``L`` shards of ``s = sum_p c_p`` entries, shard ``j`` = chunk ``j`` of every parameter
   (zero padded): ``full`` (``L s`` fp32).
2. **Intra-node reduce-scatter** of ``full``: rank ``l`` holds ``shard = sum over the node of
   shard l``.
3. ``u = shard + (S / S_r) residual`` and its ``k = ceil(density s)`` selected entries
   (``accumulate_select``, one fused pass on CPU); ``flag`` = 0, or NaN if ``u`` is non-finite.
4. **Inter-node all-gather** of the fixed-size message ``[values | int32 indices | flag]``
   among the ``N`` ranks with local rank ``l`` (one per node): the only traffic that crosses
   the slow links, ``4 (2k + 1)`` bytes per rank, ``k ~ density d / L``.
5. **Decode** into the shard: ``shard = sum_n scatter(idx_n, val_n) / W``, and the sum of
   the ``N`` flags.
6. **Intra-node all-gather** of ``[shard | flag]`` (``s + 1`` entries), so every rank of the
   node holds the full averaged gradient (written back into the bucket in parameter order)
   and the sum of all ``W`` ranks' flags: non-finite on any rank shows on every rank (added to
   the bucket's first entry) and then no rank commits its residual.
7. ``residual = u`` with the sent entries zeroed: per shard, ``sent + residual == u`` exactly.

Each rank keeps ``s ~ d / L`` residual entries: chunk ``l`` of the node-summed residual of each
parameter (so residuals survive DDP's bucket rebuild). Dense fallback: when
:func:`~lightning_gaussk.costmodel.byte_rule_dense` holds for ``(s, k, N)`` (or the cost model
prefers dense), step 4 is an inter-node all-reduce of ``u`` and the residual is reset.

Collective order: every collective of a bucket is issued from the hook body, in program order,
waiting on the previous one with ``work.wait()`` (it blocks the host on gloo and only orders
streams on NCCL), so all ranks issue the same collectives in the same order whatever the number
of buckets. The future of the last one (step 6) is returned; its callback issues none.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_gaussk.hook import _TELEMETRY_LOCK, _clear_residual, _commit_residual, _commit_velocity, _end_bucket, _momentum_grad, _Pending, _Slot
from lightning_gaussk.selectors import _accumulate as accumulate
from lightning_gaussk.selectors import accumulate_select, select
from lightning_gaussk.topology import Layout

if TYPE_CHECKING:
    from lightning_gaussk.hook import GaussKState

__all__ = ["NodeSlot", "node_hook"]

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class NodeSlot(_Slot):
    """Buffers of one bucket in node mode (valid while the bucket holds the same parameters).

    ``residual`` and ``work`` (``u``) hold ``s`` entries: chunk ``l`` of each parameter, at
    ``places[p] = (offset in the shard, chunk length)``."""

    def __init__(self, key: tuple[int, ...], params: list[Tensor], device: torch.device, d: int, layout: Layout) -> None:
        rpn = layout.ranks_per_node
        assert rpn is not None
        self.ranks_per_node = rpn
        chunks = [math.ceil(p.numel() / rpn) for p in params]
        self.s = s = sum(chunks)
        # per parameter: (bucket offset, numel, shard offset, chunk size)
        self.copies: list[tuple[int, int, int, int]] = []
        bucket_off = shard_off = 0
        for p, c in zip(params, chunks):
            self.copies.append((bucket_off, p.numel(), shard_off, c))
            bucket_off += p.numel()
            shard_off += c
        super().__init__(key, params, device, s)  # residual, work: s entries
        self.places = [(so, layout.chunk(n)[1] - layout.chunk(n)[0]) for _, n, so, _ in self.copies]
        self.full = torch.zeros(rpn * s, dtype=torch.float32, device=device)  # padding stays zero
        self.shard_out = torch.empty(s + 1, dtype=torch.float32, device=device)  # [shard | flag]
        self.node_out = torch.empty(rpn * (s + 1), dtype=torch.float32, device=device)

    def to_chunks(self, buf: Tensor) -> None:
        """``full`` := the bucket in chunk order (step 1): one strided copy per parameter (two
        when its last chunk is short), no index tensors."""
        grid = self.full.view(self.ranks_per_node, self.s)
        for off, n, so, c in self.copies:
            if n == 0:
                continue
            rows, rest = divmod(n, c)
            grid[:rows, so : so + c].copy_(buf[off : off + rows * c].view(rows, c))
            if rest:
                grid[rows, so : so + rest].copy_(buf[off + rows * c : off + n])

    def from_chunks(self, buf: Tensor) -> None:
        """The bucket := the gathered shards back in parameter order (step 6)."""
        grid = self.node_out.view(self.ranks_per_node, self.s + 1)
        for off, n, so, c in self.copies:
            if n == 0:
                continue
            rows, rest = divmod(n, c)
            buf[off : off + rows * c].view(rows, c).copy_(grid[:rows, so : so + c])
            if rest:
                buf[off + rows * c : off + n].copy_(grid[rows, so : so + rest])


def node_hook(state: GaussKState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """Node mode for one bucket (steps 1-7 of the module docstring)."""
    layout = state.layout
    rpn, nodes, world = layout.ranks_per_node, layout.nodes, layout.world_size
    assert rpn is not None
    buf = bucket.buffer()
    d = buf.numel()
    timed = buf.device.type == "cpu"
    clock = time.perf_counter_ns if timed else _zero
    t0 = clock()
    slot = state._slot_for(bucket.index(), bucket.parameters(), d, buf.device)
    assert isinstance(slot, NodeSlot)
    s = slot.s
    shard = slot.shard_out[:s]
    tel = state.telemetry

    # 1-2: chunk order, intra-node reduce-scatter
    slot.to_chunks(buf)
    _reduce_scatter(shard, slot.full, group=state._intra, async_op=True).wait()
    t1 = clock()

    # 3: u and its selection (or the dense fallback)
    k = state.k_for(s)
    scale = slot.scale.reciprocal().mul_(state.loss_scale) if state._scaled else None  # S / S_r
    grad_copy = _serve_requests(state, bucket, slot, shard)
    u = slot.work
    dense = state.prefer_dense(s, k, nodes, buf.device.type)
    indices: Tensor | None = None
    grad = shard if slot.velocity is None else _momentum_grad(state, slot, shard, scale)  # DGC: velocity of the shard
    if dense:
        accumulate(slot.residual, grad, scale, out=u) if state.error_feedback else u.copy_(grad)
        t2 = clock()
        dist.all_reduce(u, group=state._inter, async_op=True).wait()  # 4 (dense)
        t3 = clock()
        torch.div(u, world, out=shard)  # 5 (dense)
        slot.shard_out[s:].copy_(shard.sum() * 0.0)  # flag: 0, or NaN if any rank's u was non-finite
        sent, inter_bytes = s, 4 * s
    else:
        if state.error_feedback:
            values, indices, flag = accumulate_select(
                slot.residual, grad, u, k, state.selector, seed=state.seed + bucket.index(), step=state.step,
                zero_grad=grad is shard, scale=scale,
            )  # u = shard + (S / S_r) residual, its top-k; shard zeroed while read (it is the decode target)
            if grad is not shard:  # momentum correction read the velocity: zero the decode target here
                shard.zero_()
        else:
            u.copy_(grad)
            values, indices = select(u, k, state.selector, seed=state.seed + bucket.index(), step=state.step)
            flag = u.sum() * 0.0
            shard.zero_()
        t2 = clock()
        if grad_copy is not None:  # a monitor asked for this step's u (this rank's shard of it)
            state.captured[bucket.index()] = {
                "u": u.clone(), "indices": indices.clone(), "k": k, "parameters": list(bucket.parameters()),
                "grad": grad_copy, "places": list(slot.places),
            }  # fmt: skip
        msg, gathered = slot.message_buffers(k, nodes)
        msg[:k].copy_(values)
        msg[k : 2 * k].view(torch.int32).copy_(indices)
        msg[2 * k].copy_(flag)
        _all_gather(gathered, msg, group=state._inter, async_op=True).wait()  # 4
        t3 = clock()
        rows = gathered.view(nodes, 2 * k + 1)  # 5: decode into the shard
        shard.index_add_(0, rows[:, k : 2 * k].reshape(-1).view(torch.int32), rows[:, :k].reshape(-1), alpha=1.0 / world)
        slot.shard_out[s:].copy_(rows[:, 2 * k].sum())
        sent, inter_bytes = k, msg.numel() * 4
    t4 = clock()

    tel["hook_calls"] += 1
    tel["dense_buckets"] += int(dense)
    tel["bytes_sent"] += inter_bytes
    tel["bytes_inter"] += inter_bytes
    tel["bytes_intra"] += 4 * (rpn - 1) * (2 * s + 1)  # reduce-scatter s, all-gather s + 1 (per peer)
    tel["bytes_dense"] += d * buf.element_size()
    tel["entries_sent"] += sent
    tel["entries_total"] += s
    _end_bucket(state, bucket)

    # 6: intra-node all-gather of [shard | flag]
    slot.handle = _all_gather(slot.node_out, slot.shard_out, group=state._intra, async_op=True)
    fut = slot.handle.get_future()
    if timed:
        with _TELEMETRY_LOCK:
            tel["intra_ns"] += t1 - t0
            tel["select_ns"] += t2 - t1
            tel["inter_ns"] += t3 - t2
            tel["decode_ns"] += t4 - t3
            tel["hook_ns"] += clock() - t0
    t5 = clock()

    def finish(fut: torch.futures.Future[Any], _pending: _Pending = _Pending(state)) -> Tensor:
        if timed:
            dt = clock() - t5
            with _TELEMETRY_LOCK:
                tel["intra_ns"] += dt
                tel["comm_ns"] += dt
        fut.value()  # re-raises a failed all-gather
        flag_all = slot.node_out.view(rpn, s + 1)[:, s].sum()  # NaN if any of the W ranks' u was non-finite
        slot.from_chunks(buf)
        buf[:1].add_(flag_all)
        if state.error_feedback:  # 7
            if indices is None:
                _clear_residual(state, slot, flag_all)
            else:
                _commit_residual(state, slot, indices, flag_all)
        elif slot.velocity is not None:
            _commit_velocity(state, slot, indices, flag_all)
        return buf

    return fut.then(finish)


def _serve_requests(state: GaussKState, bucket: dist.GradBucket, slot: NodeSlot, shard: Tensor) -> Tensor | None:
    """What a monitor asked for, in node mode, on this rank's shard: norms of the residual and
    of the node-summed gradient shard (0-d tensors, no host sync); for a capture, a copy of the
    gradient shard (returned; the hook records ``u`` and the selection with it, and ``places``:
    each parameter's ``(offset, entries)`` in the shard, its chunk ``l``)."""
    if state._norms_next:
        state.norms[bucket.index()] = (
            torch.linalg.vector_norm(slot.residual) if state.error_feedback else torch.zeros((), device=shard.device),
            torch.linalg.vector_norm(shard),
        )
    return shard.clone() if state._capture_next else None


def _zero() -> int:
    return 0
