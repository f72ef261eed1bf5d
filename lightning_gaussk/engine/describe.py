"""The line each engine logs once at setup: the mode and why, the density, the exchange, and what
a rank or a node sends. Functions of the configuration, the layout and (local SGD) the sizes the
driver computed: no state, no I/O."""

from __future__ import annotations

from lightning_gaussk.comm.layout import Layout
from lightning_gaussk.config import GaussKConfig, LocalSGDConfig

__all__ = ["fsdp_startup_line", "local_startup_line", "startup_line"]

_EXCHANGES = {
    "allgather": "all-gather (each selection to every peer: bytes per rank grow with the peers)",
    "allreduce": "bounded sparse all-reduce (about 6k(P-1)/P words per rank; the update keeps about 1.5k entries)",
    "auto": "auto (per bucket by the cost model; each choice logged once)",
}


def _density(config: GaussKConfig) -> str:
    """``density``, or its warm-up schedule."""
    if not config.warmup_steps:
        return f"{config.density}"
    return f"{config.warmup_density} -> {config.density} over {config.warmup_steps} steps"


def startup_line(config: GaussKConfig, layout: Layout, launcher_rpn: int | None = None) -> str:
    """The DDP hook's line: the layout and why ``hierarchy`` chose it (``launcher_rpn``: ranks
    per node as the launcher gave them), the density, what a rank (flat) or a node (node mode)
    sends per bucket of ``d`` entries, the exchange and the dense fallback."""
    head = f"GaussK: {layout.describe()} (hierarchy={config.hierarchy!r}, ranks per node from the launcher: {launcher_rpn})"
    if layout.mode == "node":
        L = layout.ranks_per_node
        what = (
            f"each rank selects ceil(density * d / {L}) entries of its node-summed shard, so a node sends about "
            f"density * d entries per bucket between nodes ({L}x fewer than flat mode's {L} ranks would); "
            "it assumes fast links inside a node (NVLink/NVSwitch): on PCIe-only nodes flat mode may win, "
            "`gaussk-preflight` measures both"
        )
        why = f"; auto chose node mode: {layout.nodes} nodes of {L} ranks" if config.hierarchy == "auto" else ""
    else:
        what = "each rank selects ceil(density * d) entries of a bucket of d"
        why = ""
        if config.hierarchy == "auto" and layout.world_size > 1:
            why = "; auto stayed flat: " + (
                "the launcher gives no ranks per node" if launcher_rpn is None and config.ranks_per_node is None
                else "one node, or one rank per node"
            )
    exchange = _EXCHANGES.get(config.exchange, repr(config.exchange))
    return (
        f"{head}{why}; density {_density(config)}: {what}; exchange: {exchange}; "
        f"dense fallback: {config.dense_fallback}"
    )


def fsdp_startup_line(config: GaussKConfig, layout: Layout) -> str:
    """The FSDP2 hook's line: nodes x ranks, what FSDP and the replicas exchange (the replicas are
    the same shard on the other nodes: ``nodes - 1``, this rank not counted), the density, the
    exchange and the dense fallback. One node: nothing crosses nodes, and the line says so."""
    others = layout.nodes - 1
    if others:
        between = (
            f"each rank selects ceil(density * d) entries of its shard of d and exchanges them with its {others} "
            f"replica{'s' if others > 1 else ''} on the other node{'s' if others > 1 else ''}"
        )
    else:
        between = "one node: the shard has no replica on another node, so nothing is exchanged between nodes"
    return (
        f"GaussK: FSDP2 across nodes (custom HSDP), {layout.nodes} nodes x {layout.ranks_per_node} ranks: FSDP "
        f"reduce-scatters each unit inside the node, {between}; density {_density(config)}; exchange: {config.exchange}; "
        f"dense fallback: {config.dense_fallback}"
    )


def local_startup_line(
    config: LocalSGDConfig, layout: Layout, *, d: int, d_local: int, k: int, chunk: int | None, sparse: bool,
    outer_bytes: int, dense_bytes: int,
) -> str:  # fmt: skip
    """Local SGD's line (:class:`~lightning_gaussk.engine.local.driver.SparseLocalSGD`): the layout,
    ``H``, what the outer step sends and how it moves ``theta``, and the expected message bytes per
    inner (optimizer) step, ``outer_bytes / H``, against dense DDP's ``dense_bytes`` per step.

    ``d``: entries of the model; ``d_local``: this rank's (its shard in node mode); ``k``: entries
    it sends per outer step; ``chunk``: the effective chunk (None: whole-tensor selection);
    ``sparse``: whether the exchange is sparse (False: DiLoCo, or the byte rule chose dense)."""
    H = config.sync_every
    head = f"GaussK local SGD: {layout.describe()}; H = sync_every = {H} optimizer steps without communication, then an outer step"
    if config.outer == "dense":
        outer = (
            f"dense all-reduce of the pseudo-gradients ({d:,} entries), outer Nesterov lr {config.outer_lr}, "
            f"momentum {config.outer_momentum} (DiLoCo)"
        )
    elif not sparse:
        outer = (
            f"sparse requested (density {config.density}), but sent dense: an all-reduce of the pseudo-gradients "
            f"({d_local:,} entries) moves fewer bytes (dense_fallback={config.dense_fallback!r}); outer lr {config.outer_lr}"
        )
    else:
        where = "of its node's summed shard of" if layout.mode == "node" else "of"
        how = f"top-k per chunk of {chunk}" if chunk is not None else f"selector {config.selector!r}"
        bits = f"{config.quantize}-bit values, one fp32 scale per chunk" if config.quantize else "fp32 values"
        outer = (
            f"sparse (SparseLoCo): {k:,} {where} {d_local:,} entries per outer step (density {config.density}, {how}), "
            f"{bits}, exchange: {config.exchange}; outer lr {config.outer_lr}, error feedback decay ef_decay {config.ef_decay}"
        )
    per_step = outer_bytes / H
    if layout.world_size == 1:
        sends = "one rank: nothing is exchanged"
    else:
        ratio = f" ({dense_bytes / per_step:.1f}x fewer)" if per_step else ""
        sends = (
            f"expected {per_step:,.0f} bytes per inner step ({outer_bytes:,} per outer step / {H}) against dense DDP's "
            f"{dense_bytes:,} per step{ratio}"
        )
    return f"{head}: {outer}; {sends}"
