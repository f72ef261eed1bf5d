"""The line each engine logs once at setup (the mode and why, the density, the exchange, and what
a rank or a node sends) and the one it logs at the end of a fit (what this rank sent against what
dense data parallelism would have sent, the steps, and the time in communication where it was
measured). Functions of the configuration, the layout, the sizes the driver computed and
differences of telemetry counters (:mod:`lightning_gaussk.engine.counters`): no state, no I/O."""

from __future__ import annotations

from collections.abc import Mapping

from lightning_gaussk.comm.layout import Layout
from lightning_gaussk.config import GaussKConfig, LocalSGDConfig

__all__ = [
    "fit_summary_line",
    "format_bytes",
    "fsdp_startup_line",
    "local_fit_summary_line",
    "local_startup_line",
    "startup_line",
]

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
    ``sparse``: whether the exchange is sparse (False: DiLoCo, or the byte rule chose dense). With
    ``fragments`` or ``overlap_steps`` it says how the outer steps stream and overlap."""
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
    timing = []
    if config.fragments > 1:
        timing.append(f"streaming: {config.fragments} fragments, each syncing at its own offset of the window")
    if config.overlap_steps:
        timing.append(
            f"overlapped: each exchange runs behind {config.overlap_steps} inner steps and lands as theta plus the "
            "rank's own progress"
        )
    if timing:
        outer += "; " + "; ".join(timing)
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


# ------------------------------------------------------------------------------- end of fit
def format_bytes(n: float) -> str:
    """``n`` bytes in decimal units: ``"512 B"``, ``"12.35 kB"``, ``"1.20 MB"``, ``"3.00 GB"``."""
    if abs(n) < 1000:
        return f"{n:,.0f} B"
    for unit in ("kB", "MB", "GB", "TB"):
        n /= 1000
        if abs(n) < 999.995 or unit == "TB":
            return f"{n:,.2f} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


def _seconds(ns: float) -> str:
    return f"{ns / 1e6:.1f} ms" if ns < 1e9 else f"{ns / 1e9:.2f} s"


def _fewer(dense: float, sent: float) -> str:
    if sent <= 0:
        return "nothing sent"
    return f"{dense / sent:.1f}x fewer" if dense >= sent else f"{sent / dense:.2f}x more"


def fit_summary_line(diff: Mapping[str, int], *, steps: int, layout: Layout, fsdp: bool = False) -> str:
    """The per-step hook's end-of-fit line (DDP flat or node mode, FSDP2 across nodes), from the
    difference ``diff`` of this rank's ``GaussKState.telemetry`` over the fit (rank 0 logs its own,
    labelled as such: no collective at the end of a fit) and the fit's ``steps`` optimizer steps.

    It gives the bytes this rank sent (``bytes_sent``) against what dense data parallelism would
    have sent for the same buckets (``bytes_dense``: dense DDP's all-reduce; under FSDP2, native
    HSDP's all-reduce of the shards between the replicas), how many times fewer; node mode, the
    bytes inside the node (``bytes_intra``, when any); buckets sent dense or skipped; and, where measured
    (``hook_ns`` > 0: CPU buckets, or CUDA events already complete), the time in communication
    (``comm_ns``: issue of the last collective to its completion, waiting for the slowest rank
    included; node mode and FSDP2: ``intra_ns`` + ``inter_ns``) and in the hook."""
    mode = f"FSDP2 across nodes, {layout.nodes} nodes x {layout.ranks_per_node} ranks" if fsdp else layout.describe()
    unit = "shards" if fsdp else "buckets"
    head = (
        f"GaussK fit summary, rank {layout.rank}'s own counters (not summed over ranks; {mode}): {steps} optimizer steps, "
        f"{diff.get('hook_calls', 0):,} {unit} compressed"
    )
    sent, dense = diff.get("bytes_sent", 0), diff.get("bytes_dense", 0)
    reference = "native HSDP's all-reduce of the same shards between the replicas" if fsdp else "dense DDP's all-reduce of the same buckets"
    if diff.get("hook_calls", 0) == 0:
        what = "the hook did not run: nothing was exchanged"
    elif layout.world_size == 1:
        what = "one rank: nothing was exchanged"
    elif fsdp and layout.nodes == 1:
        what = "one node: nothing was exchanged between nodes (FSDP's reduce-scatter inside the node is the whole reduction)"
    else:
        what = f"sent {format_bytes(sent)} against {format_bytes(dense)} for {reference} ({_fewer(dense, sent)})"
        if diff.get("bytes_intra", 0) > 0:  # node mode or FSDP2 with more than one rank per node
            inside = "FSDP's reduce-scatter" if fsdp else "reduce-scatter and all-gather"
            what += f"; inside the node {format_bytes(diff['bytes_intra'])} ({inside})"
    extra = []
    if diff.get("dense_buckets", 0):
        extra.append(f"{diff['dense_buckets']:,} {unit} sent dense (dense_fallback)")
    if diff.get("skipped_buckets", 0):
        extra.append(f"{diff['skipped_buckets']:,} {unit} skipped (non-finite)")
    if extra:
        what += "; " + ", ".join(extra)
    if diff.get("hook_ns", 0) > 0:
        if layout.mode == "node" or fsdp:
            intra, inter = diff.get("intra_ns", 0), diff.get("inter_ns", 0)
            comm = f"communication {_seconds(intra + inter)} (inside the node {_seconds(intra)}, between nodes {_seconds(inter)})"
        else:
            comm = (
                f"communication {_seconds(diff.get('comm_ns', 0))} (issue of the last collective to its completion, "
                "waiting for the slowest rank included)"
            )
        what += f"; {comm}; hook {_seconds(diff['hook_ns'])}, selection {_seconds(diff.get('select_ns', 0))}"
    return f"{head}; {what}"


def local_fit_summary_line(diff: Mapping[str, int], *, dense_bytes_per_step: int, sync_every: int, layout: Layout) -> str:
    """Local SGD's end-of-fit line (``gaussk_local``, ``diloco``), from the difference ``diff`` of
    this rank's ``SparseLocalSGD.telemetry`` over the fit (rank 0 logs its own): the optimizer and
    outer steps, the bytes this rank sent in the outer steps (``bytes_sent``) against what dense
    DDP would have all-reduced over the same optimizer steps (``dense_bytes_per_step`` times
    ``inner_steps``), how many times fewer, node mode the bytes inside the node, and the host wall
    time of the outer steps (``outer_ns``: the exchange and the outer update; with exchanges in
    flight behind inner steps, ``outer_hidden_ns`` and ``outer_exposed_ns`` when counted)."""
    inner, outer = diff.get("inner_steps", 0), diff.get("outer_steps", 0)
    notes = [f"H = sync_every = {sync_every}"]
    if diff.get("skipped_outer_steps", 0):
        notes.append(f"{diff['skipped_outer_steps']} skipped (non-finite)")
    if diff.get("dense_outer_steps", 0):
        notes.append(f"{diff['dense_outer_steps']} sent dense")
    head = (
        f"GaussK local SGD fit summary, rank {layout.rank}'s own counters (not summed over ranks; {layout.describe()}): "
        f"{inner} optimizer steps, "
        f"{outer} outer steps ({'; '.join(notes)})"
    )
    sent, dense = diff.get("bytes_sent", 0), dense_bytes_per_step * inner
    if layout.world_size == 1:
        what = "one rank: nothing was exchanged"
    else:
        what = (
            f"sent {format_bytes(sent)} in the outer steps against {format_bytes(dense)} for dense DDP's all-reduce over "
            f"the same {inner} optimizer steps ({_fewer(dense, sent)})"
        )
        if diff.get("bytes_intra", 0) > 0:  # node mode with more than one rank per node
            what += f"; inside the node {format_bytes(diff['bytes_intra'])}"
    if outer:
        ns = diff.get("outer_ns", 0)
        what += f"; outer steps {_seconds(ns)} of host wall time ({ns / outer / 1e6:.2f} ms each: exchange and update)"
        exposed, hidden = diff.get("outer_exposed_ns", 0), diff.get("outer_hidden_ns", 0)
        if hidden:  # overlapped exchanges (overlap_steps > 0)
            what += f"; exchanges in flight {_seconds(hidden)} behind inner steps, {_seconds(exposed)} waited for"
    return f"{head}; {what}"
