"""The line each engine logs once at setup: the mode and why, the density, the exchange, and what
a rank or a node sends. Functions of the configuration and the layout only (no state, no I/O)."""

from __future__ import annotations

from lightning_gaussk.comm.layout import Layout
from lightning_gaussk.config import GaussKConfig

__all__ = ["fsdp_startup_line", "startup_line"]

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
    """The FSDP2 hook's line: nodes x ranks, what FSDP and the replicas exchange, the density, the
    exchange and the dense fallback."""
    return (
        f"GaussK: FSDP2 across nodes (custom HSDP), {layout.nodes} nodes x {layout.ranks_per_node} ranks: FSDP "
        "reduce-scatters each unit inside the node, each rank selects ceil(density * d) entries of its shard of d "
        f"and exchanges them with its {layout.nodes} replicas; density {_density(config)}; exchange: {config.exchange}; "
        f"dense fallback: {config.dense_fallback}"
    )
