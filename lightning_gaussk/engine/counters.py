"""The engines' telemetry counters, declared once: names, meanings, and the difference of readings.

Every counter is a cumulative ``int`` (saved with the state, so it continues across a resume); a
figure over some steps is the difference of two readings (:func:`counter_diff`), computed by
:mod:`lightning_gaussk.observe.telemetry`. A counter that means the same in both engines has one
name in both (``bytes_sent``, ``bytes_wire``, ``bytes_intra``, ``entries_sent``). ``*_ns`` are
host wall times (the per-step hook measures them on CPU buckets only).
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["COUNTER_DOCS", "LOCAL_SGD_COUNTERS", "TELEMETRY_COUNTERS", "counter_diff"]

#: what each counter counts, by name (one entry for a name both engines keep)
COUNTER_DOCS: dict[str, str] = {
    # both engines: the exchange
    "bytes_sent": "this rank's message bytes of the exchange (values, indices, flag)",
    "bytes_wire": "bytes this rank puts on the wire in the exchange, as its collectives' algorithms send them "
    "(a ring all-gather sends P - 1 messages): whether traffic grows with P",
    "bytes_intra": "node mode (0 in flat mode): bytes this rank sends inside its node (reduce-scatter, all-gather)",
    "entries_sent": "entries of u offered to the exchange, summed (k; d when sent dense)",
    # the per-step hook (GaussKState.telemetry)
    "hook_calls": "buckets (or shards) compressed",
    "bytes_dense": "bytes of the dense buckets the messages replaced",
    "skipped_buckets": "buckets whose commit was skipped: a rank's u was non-finite",
    "entries_total": "entries of the buckets, summed (d)",
    "select_ns": "forming u = grad + residual and selecting (CPU buckets only)",
    "comm_ns": "issue of the last collective -> its completion callback (CPU buckets only)",
    "hook_ns": "the hook body, selection included (CPU buckets only)",
    "dense_buckets": "buckets sent dense by dense_fallback",
    "bytes_inter": "node mode: bytes this rank sends to other nodes (its message: = bytes_sent)",
    "intra_ns": "node mode: the intra-node collectives (CPU buckets only)",
    "inter_ns": "node mode: the inter-node exchange (CPU buckets only)",
    "decode_ns": "node mode: decoding the exchange (CPU buckets only)",
    # local SGD (SparseLocalSGD.telemetry)
    "inner_steps": "optimizer steps seen",
    "outer_steps": "outer steps run (skipped ones included)",
    "skipped_outer_steps": "outer steps skipped on every rank: a rank's pseudo-gradient was non-finite",
    "dense_outer_steps": "outer steps sent dense (outer='dense', or the byte rule)",
    "outer_ns": "host wall time in outer steps",
    "outer_exposed_ns": "host wall time of the outer steps' landings: waiting for the exchange, decoding it, committing",
    "outer_hidden_ns": "outer exchanges' time behind inner steps, launch to completion (overlap_steps > 0; "
    "completion seen at the next optimizer step)",
}

#: counters of the per-step hook (:attr:`GaussKState.telemetry <lightning_gaussk.engine.state.GaussKState>`)
TELEMETRY_COUNTERS = (
    "hook_calls",
    "bytes_sent",
    "bytes_dense",
    "skipped_buckets",
    "entries_sent",
    "entries_total",
    "select_ns",
    "comm_ns",
    "hook_ns",
    "dense_buckets",
    "bytes_intra",
    "bytes_inter",
    "intra_ns",
    "inter_ns",
    "decode_ns",
    "bytes_wire",
)

#: counters of local SGD (:attr:`SparseLocalSGD.telemetry <lightning_gaussk.engine.local.driver.SparseLocalSGD>`)
LOCAL_SGD_COUNTERS = (
    "inner_steps",
    "outer_steps",
    "skipped_outer_steps",
    "dense_outer_steps",
    "bytes_sent",
    "bytes_wire",
    "bytes_intra",
    "entries_sent",
    "outer_ns",
    "outer_exposed_ns",
    "outer_hidden_ns",
)


def counter_diff(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    """``after - before`` per counter of ``after`` (a counter missing from ``before`` counts from 0)."""
    return {key: int(after.get(key, 0)) - int(before.get(key, 0)) for key in after}
