"""Reshard policies: a save converted to the state dict of one rank of another layout, chosen by
the marker the save carries.

Which policy
------------
A saved state dict says how its residuals are laid out in ``layout["sharding"]``: no marker for a
DDP hook state (per-parameter residuals, whole or in node-mode chunks), ``"fsdp2-dim0"``
(:data:`lightning_gaussk.engine.fsdp.SHARDING`) for an FSDP2 hook state (dim-0 row shards in
node-mean units). :func:`policy_for` maps the marker to its :class:`ReshardPolicy`; every reader
(:meth:`~lightning_gaussk.checkpoint.formats.SavedState.state_for`, and through it
:func:`~lightning_gaussk.checkpoint.protocol.restore_state`) takes the policy from the save, never
from the type of the state it loads into. Each policy loads a rank's own state exactly on the same
layout and otherwise gives the new ranks the pending averaged update of the saved ones, with a
warning on rank 0.

DDP: the per-parameter policy
-----------------------------
Saved layout: ``W`` ranks, flat or ``N`` nodes of ``L`` ranks; new layout: ``W'`` ranks, flat or
``N'`` nodes of ``L'`` ranks. What the saved ranks still owe the model, per parameter (full size),
is the pending averaged update

    flat:  P = (1/W) sum_r r_r                    (r_r: rank r's residual of the whole parameter)
    node:  P[chunk l] = (1/W) sum_n R_{n,l}       (R_{n,l}: chunk l of node n's summed residual,
                                                   held by local rank l of node n)

The new layout is given the same ``P``:

    new flat rank:              r' = P                      so (1/W') sum_r' r' = P
    new node rank (n', l'):     R'_{n',l'} = L' P[chunk l'] so (1/W') sum_n' R'_{n'} = N' L' P / W' = P

Flat to flat on another world size this is the mean of the saved residuals (the earlier policy).
``P`` is reassembled from the shards one file at a time (a running sum per parameter chunk: memory
is one ``P`` plus one shard, whatever ``W``). Step and counters come from saved rank 0. The same
layout (same ``W`` and ``L``; ``L = 1`` counts as flat) loads each rank's own file exactly.

Momentum correction's velocities (``state["velocity"]``) are kept in the residuals' layout (flat:
the rank's velocity of the whole parameter; node mode: chunk ``l`` of the node's summed velocity),
so they follow the same rule: the new layout carries the same averaged velocity
``V = (1/W) sum_r v_r`` (``v' = V``, node ``V' = L' V[chunk l']``). No velocity is dropped.

Local SGD: the error feedback's owed update
--------------------------------------------
A local SGD save (:class:`~lightning_gaussk.engine.local.driver.SparseLocalSGD`) keeps per rank
its error feedback ``e_r`` in the residuals' layout (flat: the whole parameter; node mode: chunk
``l`` of the node's summed buffer), and what the ranks still owe ``theta`` is its mean
``(1/W) sum_r e_r``: the DDP rule above carries it to the new layout unchanged (``e' = P``, node
``E' = L' P[chunk l']``). ``theta`` and the outer momentum are global (rank 0's, or the
checkpoint's shared part). Each rank's own parts do not survive another layout: its local model
and inner optimizer state (every rank restarts from ``theta``; the framework, or the user's
optimizer, keeps its own inner state) and its landings in flight (their ``theta`` and ``e`` were
committed when saved; the progress they would have kept is lost). So a mid-window save resumed on
another layout loses the partial window: the state says so (``"resharded_from"``) and the driver
warns and starts a new window (:func:`local_sgd_state_for_layout`).

FSDP2: the row policy
---------------------
An FSDP2 save on ``N`` nodes of ``L`` ranks holds, on rank ``(n, l)``, node ``n``'s residual (a node
mean) on the rows of dim-0 shard ``l`` of each parameter. On the same ``(N, L)`` each rank loads its
own shard exactly; on another ``(N', L')``, per parameter,

    P[rows of shard l] = (1/N) sum_n r_{n,l}
    r'_{n',l'} = P[rows of shard l' under L']        so (1/N') sum_n' r' = P

``P`` is assembled one saved file at a time; velocities follow the same rule. Step and counters
come from saved rank 0; the parameters' full shapes (``state["shapes"]``) place the rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_gaussk.checkpoint.layouts import describe_layout, residual_layout
from lightning_gaussk.comm.layout import Layout, chunk_bounds
from lightning_gaussk.comm.topology import dim0_shard
from lightning_gaussk.engine.fsdp import SHARDING
from lightning_gaussk.utils.log import rank_zero_warn

__all__ = [
    "LOCAL_SGD_POLICY",
    "ReshardPolicy",
    "average_states",
    "fsdp_state_for_layout",
    "local_sgd_state_for_layout",
    "pending_update",
    "policy_for",
    "reshard_state",
    "residuals_for_layout",
    "sharding_of",
    "state_for_layout",
    "warn_layout_change",
]

#: one saved rank's state dict by its rank (a reader of a save; see ``SavedState.read``)
ReadRank = Callable[[int], Mapping[str, Any]]
#: the per-parameter buffers of a rank's state dict, both in the residuals' layout: one policy for both
_BUFFERS = ("residuals", "velocity")


# ----------------------------------------------------------------------------- DDP: per parameter
def _pending_buffers(
    read_rank: ReadRank, saved: Layout
) -> tuple[dict[str, Any], dict[str, dict[str, Tensor]]]:
    """The pending averages of every per-parameter buffer (``"residuals"``, ``"velocity"``) from the
    saved ranks' state dicts, read one at a time: ``(rank 0's state without the buffers,
    {buffer: {name: full-size average}})``. A buffer no rank saved is absent from the result; a
    parameter missing on a rank counts as zeros there."""
    ws, rpn = residual_layout(saved)
    parts = 1 if rpn is None else rpn
    sums: dict[str, dict[str, dict[int, Tensor]]] = {}
    first: dict[str, Any] | None = None
    for r in range(ws):
        sd = read_rank(r)
        if first is None:
            first = {k: v for k, v in sd.items() if k not in _BUFFERS}
        local = r % parts
        for key in _BUFFERS:
            what = "residual" if key == "residuals" else key
            for name, t in (sd.get(key) or {}).items():
                per = sums.setdefault(key, {}).setdefault(name, {})
                flat = t.detach().reshape(-1)
                if local in per:
                    if per[local].numel() != flat.numel():
                        raise ValueError(
                            f"GaussK saved state: {what} {name!r} chunk {local} has {flat.numel()} entries on rank {r}, "
                            f"{per[local].numel()} on an earlier rank"
                        )
                    per[local].add_(flat.to(torch.float32))
                else:
                    per[local] = flat.to(torch.float32, copy=True)
        del sd
    assert first is not None
    out: dict[str, dict[str, Tensor]] = {}
    for key, by_name in sums.items():
        what = "residual" if key == "residuals" else key
        for name, per in by_name.items():
            if sorted(per) != list(range(parts)):
                raise ValueError(
                    f"GaussK saved state: {what} {name!r} has chunks {sorted(per)} of {parts} saved; cannot reassemble it"
                )
            p = per[0] if parts == 1 else torch.cat([per[l] for l in range(parts)])
            per.clear()
            out.setdefault(key, {})[name] = p.div_(ws)
    return first, out


def pending_update(read_rank: ReadRank, saved: Layout) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``P`` per parameter (see the module docstring) from the saved ranks' state dicts, reading
    them one at a time through ``read_rank(r)``, ``r = 0 .. W-1``: running sums per (parameter,
    chunk), so memory holds one ``P`` and one state dict. Returns ``(rank 0's state without
    residuals and velocities, P)``. A parameter missing on a rank counts as a zero residual there.
    (:func:`state_for_layout` averages the velocities in the same pass, by the same rule.)"""
    first, buffers = _pending_buffers(read_rank, saved)
    return first, buffers.get("residuals", {})


def residuals_for_layout(pending: Mapping[str, Tensor], target: Layout) -> dict[str, Tensor]:
    """The target rank's residuals (or velocities) carrying ``P``: flat ``r' = P``; node mode
    (``L'`` ranks per node, local rank ``l'``) ``R' = L' P[chunk l']``. Tensors of ``pending`` may
    be reused."""
    _, rpn = residual_layout(target)
    if rpn is None:
        return dict(pending)
    out: dict[str, Tensor] = {}
    for name, p in pending.items():
        start, stop = chunk_bounds(p.numel(), rpn, target.local_rank)
        out[name] = p[start:stop].mul(rpn)
    return out


def state_for_layout(read_rank: ReadRank, saved: Layout, target: Layout) -> dict[str, Any]:
    """The state dict for ``target`` (a rank of the new layout) from the saved ranks' state dicts.

    Same layout (``W`` and ``L`` equal): rank ``target.rank``'s own state, exactly (one read).
    Otherwise the policy of the module docstring for the residuals and, when saved, the velocities,
    with :func:`warn_layout_change` (rank 0)."""
    if residual_layout(saved) == residual_layout(target):
        return {**read_rank(target.rank), "layout": target.to_dict()}
    warn_layout_change(describe_layout(saved), describe_layout(target))
    first, buffers = _pending_buffers(read_rank, saved)
    out = {**first, "layout": target.to_dict(), "residuals": residuals_for_layout(buffers.get("residuals", {}), target)}
    if "velocity" in buffers:
        out["velocity"] = residuals_for_layout(buffers["velocity"], target)
    return out


def average_states(per_rank: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """One state dict whose residuals (and velocities, when saved) are the mean over ``per_rank``
    of each parameter's saved buffer (flat policy ``r' = P``; a parameter missing on a rank counts
    as zeros there), summed one rank at a time so memory holds one running sum per parameter."""
    items = per_rank if isinstance(per_rank, (list, tuple)) else list(per_rank)
    if not items:
        raise ValueError("average_states: `per_rank` is empty")
    first, buffers = _pending_buffers(lambda r: items[r], Layout(len(items), 0))
    return {**first, "residuals": buffers.get("residuals", {}), **({"velocity": buffers["velocity"]} if "velocity" in buffers else {})}


def warn_layout_change(saved: str, now: str) -> None:
    """Say, once (rank 0), that saved residuals are redistributed because the layout changed."""
    rank_zero_warn(
        f"Resuming GaussK state saved with {saved} on {now}: residuals follow the documented policy, the new ranks "
        "carry the same pending averaged update P = (1/W) sum of the saved residuals (flat: each rank starts from "
        "the mean of the saved residuals, r' = P; node mode: R' = L' P[chunk]); momentum-correction velocities "
        "follow the same rule; see docs/checkpointing.md."
    )


# ----------------------------------------------------------------------------- local SGD
#: a local SGD rank's own parts, which do not survive a change of layout
_PER_RANK_ONLY = ("local", "optimizer", "in_flight")


def local_sgd_state_for_layout(read_rank: ReadRank, saved: Layout, target: Layout) -> dict[str, Any]:
    """The local SGD state dict for ``target`` (the policy of the module docstring).

    Same ``(W, L)``: rank ``target.rank``'s own state, exactly. Otherwise the error feedback carries
    the owed update ``P = (1/W) sum_r e_r`` (the DDP rule), ``theta``, the outer momentum, the step,
    window and counters come from saved rank 0, the per-rank parts (``local``, ``optimizer``,
    ``in_flight``) are dropped, and ``"resharded_from"`` holds the saved layout (the driver warns)."""
    if residual_layout(saved) == residual_layout(target):
        return {**read_rank(target.rank), "layout": target.to_dict()}
    first, buffers = _pending_buffers(read_rank, saved)
    out = {k: v for k, v in first.items() if k not in _PER_RANK_ONLY}
    out["layout"] = target.to_dict()
    out["residuals"] = residuals_for_layout(buffers.get("residuals", {}), target)
    out["resharded_from"] = {**saved.to_dict(), "in_flight": len(first.get("in_flight") or ())}
    return out


# ----------------------------------------------------------------------------- FSDP2: by rows
def fsdp_state_for_layout(read_rank: ReadRank, saved: Layout, target: Layout) -> dict[str, Any]:
    """The state dict for ``target`` from an FSDP2 save (the row policy of the module docstring).

    Same ``(N, L)``: rank ``target.rank``'s own state, exactly (one read, its marker kept).
    Otherwise :func:`reshard_state`, with a warning (rank 0)."""
    if (saved.world_size, saved.ranks_per_node) == (target.world_size, target.ranks_per_node):
        return dict(read_rank(target.rank))
    rank_zero_warn(
        f"Resuming GaussK FSDP2 state saved on {saved.nodes} nodes x {saved.ranks_per_node} ranks on "
        f"{target.nodes} nodes x {target.ranks_per_node} ranks: each new rank starts from the pending averaged update "
        "P = (1/N) sum_n r_{n,l} on its rows (velocities alike); see docs/fsdp.md"
    )
    return reshard_state(read_rank, saved, target)


def reshard_state(read_rank: ReadRank, saved: Layout, target: Layout) -> dict[str, Any]:
    """Rank ``target.rank``'s state dict from a save on another ``(N, L)``: per parameter the pending
    update ``P = (1/N) sum_n r_{n,l}`` (each saved shard added at its rows, one file at a time), and
    ``r' = P`` on the target rank's rows; the same for velocities. Step and counters: saved rank 0."""
    first = dict(read_rank(0))
    shapes = {n: tuple(s) for n, s in first.get("shapes", {}).items()}
    pending: dict[str, dict[str, Tensor]] = {kind: {} for kind in _BUFFERS}
    for r in range(saved.world_size):
        sd = first if r == 0 else read_rank(r)
        at = Layout(saved.world_size, r, saved.ranks_per_node)
        for kind, acc in pending.items():
            for name, tensor in (sd.get(kind) or {}).items():
                start, stop = _rows(shapes, name, at)
                full = acc.setdefault(name, torch.zeros(math.prod(shapes[name]), dtype=torch.float32))
                full[start:stop].add_(tensor.reshape(-1).float(), alpha=1.0 / saved.nodes)
    out = {k: v for k, v in first.items() if k not in _BUFFERS}
    out["layout"] = {**target.to_dict(), "sharding": SHARDING}
    for kind, acc in pending.items():
        if acc or kind == "residuals":
            out[kind] = {name: full[slice(*_rows(shapes, name, target))].clone() for name, full in acc.items()}
    return out


def _rows(shapes: Mapping[str, tuple[int, ...]], name: str, layout: Layout) -> tuple[int, int]:
    """Flat ``[start, stop)`` of ``layout``'s rank's dim-0 shard of parameter ``name``."""
    start, stop, _ = dim0_shard(shapes[name], layout)
    return start, stop


# ----------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class ReshardPolicy:
    """How the saves of one kind of hook state are converted for a rank of a new layout.

    ``sharding`` is the marker the saves carry in ``layout["sharding"]`` (None: none); ``saved_by``
    names the states that write it (for messages); ``state_for(read_rank, saved, target)`` returns
    the state dict of rank ``target.rank`` of ``target`` from the save made on ``saved``, reading
    saved rank ``r``'s state dict through ``read_rank(r)``."""

    sharding: str | None
    saved_by: str
    state_for: Callable[[ReadRank, Layout, Layout], dict[str, Any]] = field(repr=False)


_POLICIES: dict[str | None, ReshardPolicy] = {
    p.sharding: p
    for p in (
        ReshardPolicy(None, "a DDP hook state (GaussKState: per-parameter residuals)", state_for_layout),
        ReshardPolicy(SHARDING, "an FSDP2 hook state (GaussKFSDPState: dim-0 row shards)", fsdp_state_for_layout),
    )
}


LOCAL_SGD_POLICY = ReshardPolicy(None, "a local SGD state (SparseLocalSGD: error feedback per rank)", local_sgd_state_for_layout)


def sharding_of(state_dict: Mapping[str, Any]) -> str | None:
    """The marker a saved state dict carries: ``state_dict["layout"]["sharding"]``, None without one
    (every DDP save, and every format from before the marker)."""
    layout = state_dict.get("layout")
    return layout.get("sharding") if isinstance(layout, Mapping) else None


def policy_for(sharding: str | None) -> ReshardPolicy:
    """The policy of the saves marked ``sharding`` (None: the DDP per-parameter policy). Raises
    ``ValueError`` naming the marker and the known ones for a marker no policy knows."""
    try:
        return _POLICIES[sharding]
    except KeyError:
        known = ", ".join(repr(k) for k in _POLICIES)
        raise ValueError(
            f"GaussK saved state is marked sharding={sharding!r}, which no reshard policy knows (known: {known}); "
            "was it written by another version of lightning_gaussk?"
        ) from None
