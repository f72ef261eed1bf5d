"""The core entry: :func:`reduce`, one tensor of one step through the whole pipeline.

It knows nothing of DDP: a driver gives a ``key`` (an int naming the tensor, stable across steps:
a DDP bucket index, an FSDP2 shard), the ``params`` whose gradients the flat ``grad`` concatenates
(in order), and gets back a future of ``grad`` holding the averaged update. The DDP comm hook
(:func:`lightning_gaussk.gaussk_hook`) is a thin adapter over it.

One tensor of ``d`` entries, on a rank of ``W``, ``k = ceil(density d_local)``::

    1. slot       the key's buffers: residual r, velocity v (momentum correction), u
    2. topology   flat: u's source is grad itself; node: chunk order + intra-node
                  reduce-scatter, this rank's shard of s ~ d / L entries
    3. select     u = g + (S / S_r) r   (g: the gradient, or v := m v + g with momentum
                  correction), exactly k entries of u and a flag (0, or NaN if u is non-finite);
                  dense when the cost rule says so (dense_fallback)
    4. exchange   all-gather / bounded all-reduce / dense all-reduce among the peers
                  -> the update (1 / W) sum of what each rank delivered, and what this rank delivered
    5. topology   node: intra-node all-gather of [shard | flag]; the update into grad, and the
                  sum of every rank's flag added to grad's first entry (non-finite anywhere shows
                  everywhere, so a GradScaler skips the step as with plain DDP)
    6. commit     r := u with the delivered entries zeroed (v the same, masked), unless the
                  flag is non-finite: per rank, sent + residual == u, bit for bit

Collective order: every collective is issued from this body, in program order; only the last one
may still be in flight when it returns, and the callback issues none, so all ranks issue the same
collectives in the same order whatever the number of buckets. No host sync on devices: sizes are
fixed by ``(k, d, P)``, and the commit's choice stays on the device.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_gaussk.comm.exchange import Delivery, Exchange, Selection
from lightning_gaussk.comm.inflight import Pending
from lightning_gaussk.engine.state import GaussKState
from lightning_gaussk.comm.slot import Slot
from lightning_gaussk.engine.timing import StageClock
from lightning_gaussk.comm.topology import Topology
from lightning_gaussk.selection.selectors import _accumulate as accumulate  # the one formula of u
from lightning_gaussk.selection.selectors import accumulate_select, select

__all__ = ["reduce"]


def reduce(state: GaussKState, key: int, params: list[Tensor], grad: Tensor) -> torch.futures.Future[Tensor]:
    """Steps 1-6 of the module docstring for one flat gradient ``grad`` (fp32, bf16 or fp16) of
    ``params``; returns a future of ``grad`` overwritten with the averaged update."""
    if not state._layout_ready:  # raw use: decided at the first call, the same point on every rank
        state.setup_layout()
    topo = state.topology

    # Step 1: the key's slot (residuals follow their parameters if the key's parameters changed)
    slot = state.store.slot_for(
        key, params, lambda ids: topo.make_slot(ids, params, grad.device, grad.numel()),
        state.loss_scale, state._scaled, state.config.momentum_correction is not None,
    )  # fmt: skip
    clock = StageClock(state, slot, grad.device)  # host ns on CPU, CUDA events (read later) on a GPU
    t0 = clock.mark()

    # Step 2: topology in
    local = topo.enter(slot, grad)
    t1 = clock.mark()

    # Step 3: u = g + (S / S_r) r and its selection, or u for a dense exchange
    d, route = local.numel(), topo.route
    k = state.k_for(d)
    exchange = state.exchange_for(d, k, route.peers, grad.device.type)
    scale = slot.scale.reciprocal().mul_(state.loss_scale) if state._scaled else None  # S / S_r, on the device
    grad_copy = _serve_requests(state, key, slot, local)
    g = local if slot.velocity is None else _velocity(state, slot, local, scale)  # DGC: the residual accumulates v
    target = topo.target(slot, grad, local)
    sel = _select(state, key, slot, g, target, k, scale) if exchange.sparse else _dense_u(state, slot, g, scale)
    if sel is not None and exchange.positional:  # the same update whatever order the bucket holds its parameters in
        sel.order, sel.order_inv = slot.canonical_order(state.store.ranks())
    t2 = clock.mark()
    if grad_copy is not None and sel is not None:
        state.captured[key] = {
            "u": slot.work.clone(), "indices": sel.indices.clone(), "k": k, "parameters": list(params),
            "grad": grad_copy, "places": list(slot.places),
        }  # fmt: skip

    # Step 4: the exchange (all but its last collective complete when launch returns)
    launched = exchange.launch(slot.work, sel, target, route, slot.cache)
    _count(state, topo, slot, exchange, grad, k, d)
    delivery: Delivery | None = None
    if topo.gathers:  # the update goes back through one more collective: finish the exchange first
        launched.work.wait()
        t3 = clock.mark()
        delivery = launched.finish()
        t4 = clock.mark()
        slot.handle = topo.leave(slot, target, delivery.flag)  # Step 5, issued here
        spans = [("intra_ns", t0, t1), ("inter_ns", t2, t3), ("decode_ns", t3, t4)]
    else:
        slot.handle = launched.work  # see Slot.handle
        spans = []
    t5 = clock.mark()
    spans += [("select_ns", t1, t2), ("hook_ns", t0, t5)]
    indices = None if sel is None else sel.indices

    def finish(fut: torch.futures.Future[Any], _pending: Pending = Pending(state)) -> Tensor:
        t6 = clock.mark()  # the last collective is complete
        clock.spans([*spans, ("comm_ns", t5, t6), *([("intra_ns", t5, t6)] if topo.gathers else [])])
        fut.value()  # re-raises a failed collective (peer died, timeout): never decode a stale buffer
        done = delivery if delivery is not None else launched.finish()
        flag = topo.arrive(slot, grad, target, done.flag)  # Step 5: the update into grad
        grad[:1].add_(flag)  # non-finite on any rank shows on every rank, no host sync
        # Step 6: commit
        ok = state.store.commit(
            slot, None if done.everything else indices, done.delivered, flag, state.loss_scale,
            error_feedback=state.error_feedback, masking=state.config.momentum_masking,
        )  # fmt: skip
        if not ok:
            state.telemetry["skipped_buckets"] += 1
        return grad

    return slot.handle.get_future().then(finish)


def _select(state: GaussKState, key: int, slot: Slot, g: Tensor, target: Tensor, k: int, scale: Tensor | None) -> Selection:
    """``u = g + (S / S_r) r`` into ``slot.work`` and its ``k`` selected entries; ``target`` is
    zeroed for the exchange to decode into (fused with the read of ``g`` when they are one tensor)."""
    u = slot.work
    fused = state.error_feedback and g is target
    if state.error_feedback:
        values, indices, flag = accumulate_select(
            slot.residual, g, u, k, state.selector, seed=state.seed + key, step=state.step, zero_grad=fused, scale=scale,
        )  # fused on CPU: one pass; flag = 0 or NaN
    else:
        u.copy_(g)
        values, indices = select(u, k, state.selector, seed=state.seed + key, step=state.step)
        flag = u.sum() * 0.0
    if not fused:
        target.zero_()
    return Selection(values, indices, flag, u.numel())


def _dense_u(state: GaussKState, slot: Slot, g: Tensor, scale: Tensor | None) -> None:
    """``u = g + (S / S_r) r`` into ``slot.work``, all of it for a dense exchange."""
    if state.error_feedback:
        accumulate(slot.residual, g, scale, out=slot.work)
    else:
        slot.work.copy_(g)
    return None


def _velocity(state: GaussKState, slot: Slot, grad: Tensor, scale: Tensor | None) -> Tensor:
    """Momentum correction (DGC): ``vel_work = m (S / S_r) velocity + grad``, what the residual
    accumulates instead of the gradient. The velocity itself changes only at the commit."""
    assert slot.velocity is not None and slot.vel_work is not None
    m = state.config.momentum_correction
    if scale is None:
        torch.mul(slot.velocity, m, out=slot.vel_work)
    else:
        torch.mul(slot.velocity, scale * m, out=slot.vel_work)
    return slot.vel_work.add_(grad)


def _serve_requests(state: GaussKState, key: int, slot: Slot, local: Tensor) -> Tensor | None:
    """What a monitor asked for this step, read before selection: norms of the residual carried
    into the step and of the gradient (0-d tensors, no host sync); for a capture, a copy of the
    gradient in fp32 (returned; ``u`` and the selection are recorded with it)."""
    if state._norms_next:
        state.norms[key] = (
            torch.linalg.vector_norm(slot.residual) if state.error_feedback else torch.zeros((), device=local.device),
            torch.linalg.vector_norm(local, dtype=torch.float32),
        )
    return local.to(torch.float32, copy=True) if state._capture_next else None


def _count(state: GaussKState, topo: Topology, slot: Slot, exchange: Exchange, grad: Tensor, k: int, d: int) -> None:
    tel, peers = state.telemetry, topo.route.peers
    sent = exchange.message_bytes(k, d, peers)
    tel["hook_calls"] += 1
    tel["dense_buckets"] += int(not exchange.sparse)
    tel["bytes_sent"] += sent
    tel["bytes_wire"] += exchange.wire_bytes(k, d, peers)
    tel["bytes_dense"] += grad.numel() * grad.element_size()
    tel["entries_sent"] += exchange.entries(k, d)
    tel["entries_total"] += d
    if topo.gathers:
        tel["bytes_inter"] += sent
        tel["bytes_intra"] += topo.intra_bytes(slot)
