"""An alpha-beta cost model of one gradient bucket's communication: sparse all-gather vs dense ring
all-reduce (and a hierarchical variant for multi-GPU nodes), plus host costs of the sparse path.

Pure functions of plain numbers (standard library only, no torch): the hook can call
:func:`prefer_dense` per bucket, and the benchmarks fit the parameters from measurements.

Notation: a bucket holds ``d`` fp32 entries, ``k`` of which each rank sends; ``W`` ranks; a link
moves ``n`` bytes between two hosts in ``alpha + n * beta`` seconds (``beta = 1 / bandwidth``,
bandwidth per host and per direction, full duplex).

Communication (ring algorithms, as gloo and NCCL use for these sizes)::

    dense ring all-reduce      T_ar(d)  = 2 (W-1) alpha + 2 (W-1)/W * 4 d * beta
    sparse ring all-gather     T_ag(k)  = (W-1) alpha + (W-1) * 4 (2k+1) * beta
        (message = k fp32 values, k int32 indices, 1 flag: ONE fixed-size message per rank)

Host work per bucket (``p`` = seconds of one streaming pass over one fp32 entry, e.g. the time
of ``torch.dot(x, x)`` divided by ``d``)::

    sparse  H_s = c + p * d * (h + s) + q * k + g * W k
            h: passes of the hook body outside selection (u = g + r, flag sum, zeroing the output)
            s: passes of the selector; q: seconds per selected entry (exact-k refinement)
            g: seconds per gathered entry (scatter-add of W k entries); c: fixed cost per call
    dense   H_d = p * d * r_d          r_d: passes of the reduction inside the all-reduce

Per bucket, sparse is predicted faster when ``H_s + T_ag(k) < H_d + T_ar(d)``. Whatever the
link, sparse is never chosen under the byte rule :func:`byte_rule_dense`, ``W (2k + 1) >= 2d``:
each rank would then receive at least the bytes of a ring all-reduce, ``(W-1)(2k+1)`` entries
against ``2 (W-1)/W d``. The bytes cross at ``W ~ 1/density``; the host costs move the break-even
lower, which the timed comparison captures.

A training step (``C`` = compute-only step time of one rank)::

    T_step = C + sum_b H_b + max(0, sum_b T_b - overlap)

``overlap`` is the communication hidden behind the backward pass (0 = none, the default).

Exchanges (``P`` peers, a bucket or shard of ``d`` entries, ``k`` selected per peer; bytes one
peer sends, = receives; :func:`exchange_bytes`, :func:`exchange_time`)::

    "dense"      ring all-reduce               B = 2 (P-1)/P * 4 d
    "allgather"  ring all-gather of k pairs    B = (P-1) * 4 (2k + 1)                grows with P
    "allreduce"  bounded sparse all-reduce     B = (P-1) * 4 (2 c1 + 1) + (P-1) * 4 (2 c2 + 1)
                 stage 1: all_to_all_single, per-peer chunks of (2 c1 + 1) words, c1 = min(ceil(3k/2P), ceil(d/P))
                 stage 2: all-gather of (2 c2 + 1) words per peer,             c2 = c1
                 so B <= 4 (P-1) (6k/P + 6): 6 words per selected entry, (P-1)/P of it, + 6 per peer

The one rule (:func:`dense_wins`, :func:`pick_exchange`): a sparse exchange is ruled out when it
moves no fewer bytes than dense (the byte rule, integer form: ``P (2k + 1) >= 2d`` for
"allgather", ``P (c1 + c2 + 1) >= d`` for "allreduce"); given a link, the cheapest predicted time
wins (ties go to the sparse exchange). The hook's ``dense_fallback="auto"``, its
``exchange="auto"``, :func:`decide`, :func:`hierarchical_bucket_time`, :func:`step_time` and the
benchmarks' tables all call it.

Node mode (``N`` nodes of ``G`` GPUs, ``P = N G`` ranks): dense intra-node reduce-scatter, the
inter-node exchange of each GPU's shard (``s = ceil(d/G)`` entries, ``k_s = bucket_k(density, s)``)
among the ``N`` GPUs with the same local rank, the node's NIC shared by its ``G`` GPUs
(``share=G``: each sees ``bandwidth / G``), decode, then dense intra-node all-gather
(:func:`hierarchical_bucket_time`). The inter-node stage is the flat formulas with ``(s, k_s, N)``.

Hook API (what ``dense_fallback="auto"`` and ``exchange="auto"`` call)::

    from lightning_gaussk.costs.model import HostCosts, Link, dense_wins, pick_exchange
    link = Link.from_gbit(10.0)                       # or Link(alpha=..., bandwidth=...) from a fit; None: bytes only
    host = HostCosts.for_device("cpu")                # or "cuda"; or fitted
    # flat mode: peers = W; node mode: the shard, peers = N nodes, share = L ranks per node
    if dense_wins(d, k, peers, link, host, exchange="allgather", share=1):   # memoise: it is pure
        ...send this bucket dense...
    pick_exchange(d, k, peers, link, host, share=1)   # "dense" | "allgather" | "allreduce"

Every rank must take the same decision (dense all-reduce and sparse all-gather are different
collectives: ranks that disagree hang or mismatch). The functions are pure, so equal arguments on
every rank suffice: pass configured or broadcast parameters, never figures each rank timed itself.
"""

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from lightning_gaussk.comm.sparse_allreduce import bounded_chunks

__all__ = [
    "BYTES_PER_ENTRY",
    "CPU_DEFAULT",
    "Decision",
    "HostCosts",
    "HostSample",
    "Link",
    "Sample",
    "EXCHANGES",
    "Workload",
    "allgather_time",
    "allreduce_time",
    "bucket_k",
    "bucket_time",
    "byte_rule_dense",
    "decide",
    "dense_bucket_time",
    "dense_host_time",
    "dense_wins",
    "exchange_bytes",
    "exchange_time",
    "fit_host_costs",
    "fit_link",
    "hierarchical_bucket_time",
    "least_squares",
    "pick_exchange",
    "prefer_dense",
    "sparse_bucket_time",
    "sparse_host_time",
    "sparse_message_bytes",
    "step_time",
    "wire_bytes",
]

BYTES_PER_ENTRY = 4  # fp32 values; int32 indices ride in the same fp32 message
EXCHANGES = ("dense", "allgather", "allreduce")  # the schemes the model prices (see the module docstring)
SPARSE_EXCHANGES = EXCHANGES[1:]


# --------------------------------------------------------------------------------------- links
@dataclass(frozen=True)
class Link:
    """Latency ``alpha`` (s per message hop) and ``bandwidth`` (bytes/s per host, each way)."""

    alpha: float
    bandwidth: float

    def __post_init__(self) -> None:
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha >= 0):
            raise ValueError(f"Link.alpha must be a finite number >= 0 (seconds), got {self.alpha!r}")
        if not (isinstance(self.bandwidth, (int, float)) and math.isfinite(self.bandwidth) and self.bandwidth > 0):
            raise ValueError(f"Link.bandwidth must be a finite number > 0 (bytes/s), got {self.bandwidth!r}")

    @property
    def beta(self) -> float:
        """Seconds per byte."""
        return 1.0 / self.bandwidth

    @classmethod
    def from_gbit(cls, gbit: float, latency_us: float = 50.0, efficiency: float = 0.95) -> "Link":
        """A link of ``gbit`` Gbit/s of which ``efficiency`` carries payload (TCP/IP headers), with
        ``latency_us`` per message hop (software + wire; 50 us is typical of TCP on Ethernet)."""
        if not (gbit > 0 and 0 < efficiency <= 1 and latency_us >= 0):
            raise ValueError(f"Link.from_gbit: need gbit > 0, 0 < efficiency <= 1, latency_us >= 0; got {gbit}, {efficiency}, {latency_us}")
        return cls(alpha=latency_us * 1e-6, bandwidth=gbit * 1e9 / 8 * efficiency)

    @property
    def gbit(self) -> float:
        return self.bandwidth * 8 / 1e9


def allreduce_time(nbytes: float, world: int, link: Link) -> float:
    """Ring all-reduce of ``nbytes`` per rank: ``2 (W-1) alpha + 2 (W-1)/W * nbytes * beta``."""
    _check_world(world)
    if world == 1:
        return 0.0
    return 2 * (world - 1) * link.alpha + 2 * (world - 1) / world * nbytes * link.beta


def allgather_time(nbytes: float, world: int, link: Link) -> float:
    """Ring all-gather of one ``nbytes`` message per rank: ``(W-1) (alpha + nbytes * beta)``."""
    _check_world(world)
    if world == 1:
        return 0.0
    return (world - 1) * (link.alpha + nbytes * link.beta)


def sparse_message_bytes(k: int) -> int:
    """One rank's message: ``k`` values, ``k`` indices, one flag, 4 bytes each: ``4 (2k + 1)``."""
    return BYTES_PER_ENTRY * (2 * k + 1)


def wire_bytes(method: str, d: int, world: int, k: int = 0, elements: int | None = None) -> float:
    """Bytes one rank SENDS per bucket (= receives, for these ring algorithms).

    ``"dense"``: ``2 (W-1)/W * 4 d``; ``"fp16"``: half of it; ``"allreduce"``: ``2 (W-1)/W * 4 elements``
    (e.g. PowerSGD's P and Q and its uncompressed tensors); ``"sparse"``: ``(W-1) * 4 (2k + 1)``.
    """
    _check_world(world)
    ring = 2 * (world - 1) / world
    if method == "dense":
        return ring * BYTES_PER_ENTRY * d
    if method == "fp16":
        return ring * 2 * d
    if method == "allreduce":
        if elements is None:
            raise ValueError("wire_bytes('allreduce', ...) needs `elements`")
        return ring * BYTES_PER_ENTRY * elements
    if method == "sparse":
        return float(_sparse_words("allgather", d, k, world) * BYTES_PER_ENTRY)
    raise ValueError(f"method must be 'dense', 'fp16', 'allreduce' or 'sparse', got {method!r}")


# --------------------------------------------------------------------------------------- host
@dataclass(frozen=True)
class HostCosts:
    """Host-side costs of one bucket (see the module docstring for the formulas).

    Attributes:
        pass_s: seconds of one streaming pass over one fp32 entry (``p``).
        hook_passes: passes of the sparse hook outside selection (``h``).
        select_passes: passes of the selector (``s``).
        select_per_k_s: seconds per selected entry (``q``).
        scatter_s: seconds per gathered entry scattered into the output (``g``).
        call_s: fixed seconds per sparse hook call (``c``: op launches, Python).
        dense_passes: passes of the reduction inside a dense all-reduce (``r_d``).
    """

    # defaults: this project's benchmark machine (Xeon, one core per rank, torch 2.13 CPU), fitted in
    # the 2-host 1 Gbit/s throughput run (docs/benchmarks.md, "Cost model"; since the fused
    # accumulate_select, nearly all passes are in "select"); call_s from the CNN run's hook
    # telemetry (whole hook minus the fitted passes, per call)
    pass_s: float = 0.40e-9
    hook_passes: float = 0.1
    select_passes: float = 9.3
    select_per_k_s: float = 0.48e-6
    scatter_s: float = 5e-9
    call_s: float = 1e-3
    dense_passes: float = 1.0

    def __post_init__(self) -> None:
        for name in ("pass_s", "hook_passes", "select_passes", "select_per_k_s", "scatter_s", "call_s", "dense_passes"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"HostCosts.{name} must be a finite number >= 0, got {v!r}")

    @classmethod
    def for_device(cls, device_type: str) -> "HostCosts":
        """Defaults per device type.

        ``"cpu"``: fitted on the benchmark machine (one core per rank, Xeon, shared; see
        docs/benchmarks.md, "Cost model"). ``"cuda"``: NOT measured here (no GPU): a streaming
        pass at ~1.5 TB/s, the histogram selector at a few passes, ~0.2 ms of launches per
        bucket: treat it as an assumption and refit on the target machine.
        """
        if device_type == "cpu":
            return CPU_DEFAULT
        if device_type in ("cuda", "xpu", "hip"):
            return cls(pass_s=4 / 1.5e12, hook_passes=6.0, select_passes=4.0, select_per_k_s=2e-11,
                       scatter_s=1e-11, call_s=0.2e-3, dense_passes=0.0)  # fmt: skip
        raise ValueError(f"device_type must be 'cpu' or 'cuda', got {device_type!r}")


CPU_DEFAULT = HostCosts()  # the fitted CPU figures (the dataclass defaults)


def sparse_host_time(d: int, k: int, world: int, host: HostCosts) -> float:
    """``H_s = c + p d (h + s) + q k + g W k``."""
    return host.call_s + host.pass_s * d * (host.hook_passes + host.select_passes) + host.select_per_k_s * k + host.scatter_s * world * k


def dense_host_time(d: int, host: HostCosts) -> float:
    """``H_d = p d r_d``."""
    return host.pass_s * d * host.dense_passes


def sparse_bucket_time(d: int, k: int, world: int, link: Link, host: HostCosts) -> float:
    """Predicted seconds for one bucket sent sparse: ``H_s + T_ag(4 (2k+1))`` (:func:`exchange_time`
    of ``"allgather"``)."""
    return exchange_time("allgather", d, k, world, link, host)


def dense_bucket_time(d: int, world: int, link: Link, host: HostCosts, bytes_per_entry: int = BYTES_PER_ENTRY) -> float:
    """Predicted seconds for one bucket all-reduced dense: ``H_d + T_ar(bytes_per_entry * d)``."""
    _check_bucket(d, 1)
    return dense_host_time(d, host) + allreduce_time(bytes_per_entry * d, world, link)


def bucket_k(density: float, d: int) -> int:
    """Entries sent from a bucket (or shard) of ``d`` entries: ``ceil(density * d)`` clamped to
    ``[1, d]`` (the ``- 1e-9`` keeps ``0.01 * 300`` at 3 despite rounding). The one formula of k,
    used by the hook, the monitor and this model (here, so that this module stays pure)."""
    return min(d, max(1, math.ceil(density * d - 1e-9)))


# --------------------------------------------------------------------------------------- exchanges
def _sparse_words(exchange: str, d: int, k: int, peers: int) -> int:
    """fp32 words one peer sends in a sparse exchange (an integer: the byte rule compares exactly)."""
    if exchange == "allgather":
        return (peers - 1) * (2 * k + 1)
    if exchange == "allreduce":
        c1, c2 = bounded_chunks(d, k, peers)
        return (peers - 1) * (2 * c1 + 1) + (peers - 1) * (2 * c2 + 1)
    raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")


def exchange_bytes(exchange: str, d: int, k: int, peers: int) -> float:
    """Bytes one peer sends (= receives) per bucket of ``d`` entries, ``k`` selected, ``P`` peers::

        "dense"      2 (P-1)/P * 4 d
        "allgather"  (P-1) * 4 (2k + 1)
        "allreduce"  (P-1) * 4 (2 c1 + 1) + (P-1) * 4 (2 c2 + 1)     (c1, c2: :func:`bounded_chunks`)

    Flat mode: ``P = W`` ranks. Node mode's inter-node stage: the shard ``s = ceil(d/G)``, its
    ``k_s`` and ``P = N`` nodes (per GPU; a node's NIC carries ``G`` times this)."""
    _check_bucket(d, k)
    _check_world(peers)
    if exchange == "dense":
        return 2 * (peers - 1) / peers * BYTES_PER_ENTRY * d
    return float(_sparse_words(exchange, d, k, peers) * BYTES_PER_ENTRY)


def _byte_rule(exchange: str, d: int, k: int, peers: int) -> bool:
    """The sparse ``exchange`` moves no fewer bytes than dense, in integers (both sides times
    ``P / (4 (P-1))``): ``P (2k + 1) >= 2d`` for "allgather", ``P (c1 + c2 + 1) >= d`` for "allreduce"."""
    if exchange == "allgather":
        return peers * (2 * k + 1) >= 2 * d
    c1, c2 = bounded_chunks(d, k, peers)
    return peers * (c1 + c2 + 1) >= d


def exchange_time(exchange: str, d: int, k: int, peers: int, link: Link, host: HostCosts | None = None,
                  share: int = 1) -> float:  # fmt: skip
    """Predicted seconds of one bucket through ``exchange``, host work included (``beta' = G / bandwidth``
    with ``share = G`` peers' exchanges on one NIC, as in node mode; 1 in flat mode)::

        "dense"      H_d + 2 (P-1) alpha + 2 (P-1)/P 4d beta'
        "allgather"  H_s + (P-1) alpha + (P-1) 4 (2k+1) beta'
        "allreduce"  H_s + g P (c1 + c2 - k) + p (d/P) (1 + s) + q c2        (region: zero, scatter, select)
                         + 2 (P-1) alpha + (P-1) 4 (2 c1 + 2 c2 + 2) beta'   (all-to-all, then all-gather)

    ``H_s`` and ``H_d`` are :func:`sparse_host_time` and :func:`dense_host_time`. The bounded
    all-reduce's extra host terms are an assumption (it was not timed here): stage 1 scatters the
    ``P c1`` received entries into a dense region of ``d/P``, selects ``c2`` of it; the decode
    scatters ``P c2`` entries instead of the all-gather's ``P k``."""
    host = CPU_DEFAULT if host is None else host
    _check_bucket(d, k)
    _check_world(peers)
    _check_world(share)
    wire = Link(link.alpha, link.bandwidth / share)
    if exchange == "dense":
        return dense_host_time(d, host) + allreduce_time(BYTES_PER_ENTRY * d, peers, wire)
    words = _sparse_words(exchange, d, k, peers)
    hops = peers - 1 if exchange == "allgather" else 2 * (peers - 1)
    t = sparse_host_time(d, k, peers, host) + hops * wire.alpha + words * BYTES_PER_ENTRY * wire.beta
    if exchange == "allreduce" and peers > 1:
        c1, c2 = bounded_chunks(d, k, peers)
        t += (host.scatter_s * peers * (c1 + c2 - k) + host.pass_s * d / peers * (1 + host.select_passes)
              + host.select_per_k_s * c2)  # fmt: skip
    return t


# --------------------------------------------------------------------------------------- the rule
@dataclass(frozen=True)
class Decision:
    """Outcome of the one rule for one sparse exchange (``sparse``, default "allgather"):
    ``dense`` and why, with both predictions in seconds (``nan`` when no link was given)."""

    dense: bool
    reason: str  # "world*(2k+1) >= 2d" / "P(c1+c2+1) >= d", "single rank", "sparse slower", "sparse faster", "fewer bytes"
    t_sparse: float
    t_dense: float
    sparse: str = "allgather"

    @property
    def exchange(self) -> str:
        """What is sent: ``"dense"`` or the sparse exchange."""
        return "dense" if self.dense else self.sparse


_BYTE_REASON = {"allgather": "world*(2k+1) >= 2d", "allreduce": "P(c1+c2+1) >= d"}


def _decide(d: int, k: int, peers: int, link: Link | None, host: HostCosts | None, exchange: str, share: int) -> Decision:
    """The one rule, for one sparse exchange against dense (see :func:`dense_wins`)."""
    _check_bucket(d, k)
    _check_world(peers)
    if exchange not in SPARSE_EXCHANGES:
        raise ValueError(f"exchange must be one of {SPARSE_EXCHANGES}, got {exchange!r}")
    if link is None:
        t_sparse = t_dense = math.nan
    else:
        t_sparse = exchange_time(exchange, d, k, peers, link, host, share)
        t_dense = exchange_time("dense", d, k, peers, link, host, share)
    if link is not None and peers == 1:
        return Decision(True, "single rank", t_sparse, t_dense, exchange)
    if _byte_rule(exchange, d, k, peers):
        return Decision(True, _BYTE_REASON[exchange], t_sparse, t_dense, exchange)
    if link is None:
        return Decision(False, "fewer bytes", t_sparse, t_dense, exchange)
    if t_sparse > t_dense:
        return Decision(True, "sparse slower", t_sparse, t_dense, exchange)
    return Decision(False, "sparse faster", t_sparse, t_dense, exchange)


def dense_wins(d: int, k: int, peers: int, link: Link | None = None, host: HostCosts | None = None,
               exchange: str = "allgather", share: int = 1) -> bool:  # fmt: skip
    """THE dense-or-sparse rule of a bucket (flat mode) or of node mode's inter-node stage.

    ``d`` entries (node mode: the shard), ``k`` selected per peer, ``peers`` = ``P`` ranks that
    exchange (flat mode: ``W``; node mode: ``N`` nodes), ``share`` = exchanges sharing one link
    (node mode: ``G`` ranks per node on the node's NIC; only the time model uses it).

    1. The byte rule: dense when the sparse ``exchange`` moves no fewer bytes than a ring
       all-reduce, ``P (2k + 1) >= 2d`` ("allgather"), ``P (c1 + c2 + 1) >= d`` ("allreduce").
    2. With a ``link``: dense also for one peer, and when :func:`exchange_time` predicts the sparse
       exchange slower than dense (``host`` defaults to :data:`CPU_DEFAULT`; ties go to sparse).

    A pure function of its arguments: every rank that passes the same ones takes the same branch.
    """
    return _decide(d, k, peers, link, host, exchange, share).dense


def pick_exchange(d: int, k: int, peers: int, link: Link | None = None, host: HostCosts | None = None, share: int = 1,
                  candidates: Sequence[str] = SPARSE_EXCHANGES) -> str:  # fmt: skip
    """The cheapest of ``"dense"`` and the sparse ``candidates`` for one bucket (``exchange="auto"``).

    Each candidate passes or fails :func:`dense_wins` (same arguments); of those that pass, the
    fastest by :func:`exchange_time` (without a link: the fewest :func:`exchange_bytes`) wins,
    ties to the earlier candidate; ``"dense"`` when none passes. So
    ``pick_exchange(..., candidates=(e,)) == "dense"`` exactly when ``dense_wins(..., exchange=e)``.
    """
    ok = [x for x in (_decide(d, k, peers, link, host, e, share) for e in candidates) if not x.dense]
    if not ok:
        return "dense"
    if link is None:
        return min(ok, key=lambda x: exchange_bytes(x.sparse, d, k, peers)).sparse
    return min(ok, key=lambda x: x.t_sparse).sparse


def bucket_time(d: int, k: int, peers: int, link: Link, host: HostCosts | None = None, exchange: str = "allgather",
                share: int = 1) -> float:  # fmt: skip
    """Predicted seconds of one bucket as the hook sends it with the dense fallback on:
    :func:`exchange_time` of ``exchange``, or of dense where :func:`dense_wins`; ``exchange="auto"``
    takes :func:`pick_exchange`'s choice, ``"dense"`` is always dense."""
    if exchange == "auto":
        chosen = pick_exchange(d, k, peers, link, host, share)
    elif exchange == "dense":
        chosen = "dense"
    else:
        chosen = "dense" if dense_wins(d, k, peers, link, host, exchange, share) else exchange
    return exchange_time(chosen, d, k, peers, link, host, share)


def byte_rule_dense(d: int, k: int, world: int) -> bool:
    """The byte rule of the all-gather, ``W (2k + 1) >= 2d`` (the sparse all-gather receives
    ``(W-1)(2k+1)`` entries per rank, a ring all-reduce ``2 (W-1)/W d``): :func:`dense_wins`
    without a link. ``world`` is the number of peers: ``W`` in flat mode, ``N`` in node mode."""
    return dense_wins(d, k, world)


def decide(d: int, k: int, world: int, link: Link, host: HostCosts | None = None) -> Decision:
    """The one rule (:func:`dense_wins`) for the all-gather with a link, with its reason and both
    predictions: dense when ``W == 1``, when ``W (2k + 1) >= 2d``, or when the sparse path is
    predicted slower (ties go to sparse)."""
    return _decide(d, k, world, link, host, "allgather", 1)


def prefer_dense(d: int, k: int, world: int, link: Link, host: HostCosts | None = None) -> bool:
    """``True`` when bucket (``d`` entries, ``k`` sent per rank, ``world`` ranks) should be sent
    dense: :func:`dense_wins` with the link (the all-gather, flat mode)."""
    return dense_wins(d, k, world, link, host)


# --------------------------------------------------------------------------------------- hierarchy
def hierarchical_bucket_time(d: int, density: float, nodes: int, gpus_per_node: int, intra: Link, inter: Link,
                             host: HostCosts, exchange: str = "allgather") -> float:  # fmt: skip
    """Node mode, per bucket (``N`` nodes of ``G`` GPUs)::

        T = T_rs^intra(4d, G)                          reduce-scatter: each GPU owns s = ceil(d/G) summed entries
          + bucket_time(s, k_s, N, inter, share=G)     k_s = bucket_k(density, s); the NIC shared by G GPUs
          + T_ag^intra(4d, G)                          all-gather of the decoded dense shards

    with ``T_rs = T_ag^dense = (G-1) alpha + (G-1)/G * 4d * beta`` (half a ring all-reduce each):
    :func:`hsdp_unit_time` plus the all-gather. The inter-node stage is :func:`bucket_time`:
    ``exchange`` ("allgather", "allreduce", "dense" or "auto"), or dense where :func:`dense_wins`
    says so, as the hook decides it.
    """
    return hsdp_unit_time(d, density, nodes, gpus_per_node, intra, inter, host, exchange) + _half_ring(d, gpus_per_node, intra)


def hsdp_unit_time(d: int, density: float, nodes: int, gpus_per_node: int, intra: Link, inter: Link,
                   host: HostCosts, exchange: str = "allgather") -> float:  # fmt: skip
    """FSDP2 across nodes (custom HSDP, :mod:`lightning_gaussk.engine.fsdp`), the gradient of one unit of
    ``d`` entries::

        T = T_rs^intra(4d, G)                          FSDP's reduce-scatter inside the node
          + bucket_time(s, k_s, N, inter, share=G)     the replica exchange of the shard s = ceil(d/G)

    No all-gather of the gradient follows (parameters and optimizer states stay sharded). With
    ``exchange="dense"`` and ``density=1`` this is plain HSDP's gradient path (its all-reduce of the
    shard across the ``N`` replicas). FSDP's parameter all-gathers, the same for every contender,
    are not counted."""
    _check_world(nodes)
    _check_world(gpus_per_node)
    shard = math.ceil(d / gpus_per_node)
    k = bucket_k(density, shard)
    inter_t = bucket_time(shard, k, nodes, inter, host, exchange, share=gpus_per_node) if nodes > 1 else 0.0
    return _half_ring(d, gpus_per_node, intra) + inter_t


def _half_ring(d: int, g: int, link: Link) -> float:
    """A reduce-scatter (or all-gather) of ``4d`` bytes among ``g`` ranks: half a ring all-reduce."""
    return (g - 1) * link.alpha + (g - 1) / g * BYTES_PER_ENTRY * d * link.beta if g > 1 else 0.0


# --------------------------------------------------------------------------------------- steps
@dataclass(frozen=True)
class Workload:
    """What a step needs: ``compute_s`` (forward, backward, optimizer of one rank, no communication)
    and the bucket sizes in entries (DDP's buckets; ``[d]`` for one bucket)."""

    compute_s: float
    buckets: tuple[int, ...]
    overlap_s: float = 0.0  # communication hidden behind backward

    def __post_init__(self) -> None:
        if not (self.compute_s >= 0 and self.overlap_s >= 0) or not self.buckets or any(b < 1 for b in self.buckets):
            raise ValueError(f"Workload needs compute_s >= 0, overlap_s >= 0 and buckets of >= 1 entries, got {self}")

    @property
    def numel(self) -> int:
        return sum(self.buckets)


def step_time(work: Workload, method: str, world: int, link: Link, host: HostCosts | None = None,
              density: float = 0.001, elements: int | None = None, auto: bool = False) -> float:  # fmt: skip
    """Predicted seconds per step: ``C + sum_b H_b + max(0, sum_b T_b - overlap)``.

    ``method``: ``"dense"`` (ring all-reduce, fp32), ``"fp16"`` (half the bytes),
    ``"allreduce"`` (``elements`` fp32 entries in total, e.g. PowerSGD's P, Q and uncompressed
    tensors: host costs then come from the caller's ``compute_s``), ``"sparse"`` (``k =
    ceil(density d)`` per bucket). ``auto=True`` with ``"sparse"`` sends each bucket the way
    :func:`decide` prefers.
    """
    host = CPU_DEFAULT if host is None else host
    hosts = comm = 0.0
    if method == "allreduce":
        if elements is None:
            raise ValueError("step_time('allreduce') needs `elements`")
        comm = allreduce_time(BYTES_PER_ENTRY * elements, world, link)
    else:
        for d in work.buckets:
            if method in ("dense", "fp16"):
                hosts += dense_host_time(d, host)
                comm += allreduce_time((BYTES_PER_ENTRY if method == "dense" else 2) * d, world, link)
            elif method == "sparse":
                k = bucket_k(density, d)
                if auto and dense_wins(d, k, world, link, host):
                    hosts += dense_host_time(d, host)
                    comm += allreduce_time(BYTES_PER_ENTRY * d, world, link)
                else:
                    hosts += sparse_host_time(d, k, world, host)
                    comm += allgather_time(sparse_message_bytes(k), world, link)
            else:
                raise ValueError(f"method must be 'dense', 'fp16', 'allreduce' or 'sparse', got {method!r}")
    return work.compute_s + hosts + max(0.0, comm - work.overlap_s)


# --------------------------------------------------------------------------------------- fitting
def least_squares(rows: Sequence[Sequence[float]], ys: Sequence[float], nonneg: bool = True) -> list[float]:
    """``argmin_x ||A x - y||^2`` by the normal equations (few columns); with ``nonneg`` a
    coefficient that comes out negative is pinned to 0 and the rest refitted."""
    if not rows or len(rows) != len(ys):
        raise ValueError("least_squares: need as many rows as targets, at least one")
    n = len(rows[0])
    active = list(range(n))
    while True:
        x_act = _solve_normal([[r[j] for j in active] for r in rows], ys)
        x = [0.0] * n
        for j, v in zip(active, x_act):
            x[j] = v
        neg = [j for j in active if x[j] < 0]
        if not nonneg or not neg:
            return x
        active.remove(min(neg, key=lambda j: x[j]))
        if not active:
            return [0.0] * n


def _solve_normal(a: Sequence[Sequence[float]], y: Sequence[float]) -> list[float]:
    n = len(a[0])
    m = [[sum(r[i] * r[j] for r in a) for j in range(n)] + [sum(r[i] * t for r, t in zip(a, y))] for i in range(n)]
    for i in range(n):  # Gauss-Jordan with partial pivoting; a tiny ridge keeps it solvable
        m[i][i] += 1e-30 + 1e-12 * abs(m[i][i])
        p = max(range(i, n), key=lambda r: abs(m[r][i]))
        m[i], m[p] = m[p], m[i]
        piv = m[i][i]
        if piv == 0:
            continue
        m[i] = [v / piv for v in m[i]]
        for r in range(n):
            if r != i and m[r][i] != 0:
                f = m[r][i]
                m[r] = [vr - f * vi for vr, vi in zip(m[r], m[i])]
    return [m[i][n] for i in range(n)]


@dataclass(frozen=True)
class Sample:
    """One timed collective: ``kind`` "allreduce" (``nbytes`` per rank) or "allgather"
    (``nbytes`` per rank's message) or "p2p" (one message), on ``world`` ranks, ``seconds``."""

    kind: str
    world: int
    nbytes: float
    seconds: float

    def features(self) -> tuple[float, float]:
        """(latency hops, bytes through the busiest port) so that ``seconds = alpha*f0 + beta*f1``."""
        w = self.world
        if self.kind == "allreduce":
            return 2.0 * (w - 1), 2.0 * (w - 1) / w * self.nbytes
        if self.kind == "allgather":
            return float(w - 1), (w - 1) * self.nbytes
        if self.kind == "p2p":
            return 1.0, float(self.nbytes)
        raise ValueError(f"Sample.kind must be 'allreduce', 'allgather' or 'p2p', got {self.kind!r}")


def fit_link(samples: Iterable[Sample]) -> Link:
    """Fit ``alpha`` and ``beta`` to timed collectives, ``seconds = alpha * hops + beta * bytes``
    (see :meth:`Sample.features`), in two stages that keep noise in one regime out of the other:

    1. ordinary least squares on all samples (large, bandwidth-bound messages dominate it), which
       fixes ``beta``;
    2. ``alpha`` = the median, over the latency-bound samples (``alpha hops > beta bytes`` by the
       first fit), of ``(seconds - beta * bytes) / hops`` (unchanged when there are none).

    Exact samples of a link give that link back."""
    samples = list(samples)
    if len(samples) < 2:
        raise ValueError("fit_link needs at least 2 samples")
    for s in samples:
        if not (s.seconds > 0 and s.nbytes >= 0 and s.world >= 2):
            raise ValueError(f"fit_link: need seconds > 0, nbytes >= 0 and world >= 2, got {s}")
    feats = [s.features() for s in samples]
    alpha, beta = least_squares([list(f) for f in feats], [s.seconds for s in samples])
    if beta <= 0:
        raise ValueError("fit_link: samples carry no bandwidth information (beta <= 0); add larger messages")
    small = [(s.seconds - beta * f1) / f0 for s, (f0, f1) in zip(samples, feats) if alpha * f0 > beta * f1]
    if small:
        small.sort()
        mid = len(small) // 2
        alpha = max(0.0, small[mid] if len(small) % 2 else 0.5 * (small[mid - 1] + small[mid]))
    return Link(alpha=alpha, bandwidth=1.0 / beta)


@dataclass(frozen=True)
class HostSample:
    """One timed sparse hook call (or its parts): bucket ``d``, ``k`` selected, ``world``, ``seconds``."""

    d: int
    k: int
    world: int
    seconds: float


def fit_host_costs(pass_s: float, select_samples: Iterable[HostSample], rest_samples: Iterable[HostSample] = (),
                   base: HostCosts | None = None) -> HostCosts:  # fmt: skip
    """Fit the sparse host costs from a measured pass time ``pass_s`` (s/entry) and timings.

    ``select_samples``: selector calls, ``seconds = p d s + q k`` -> ``s``, ``q`` (vary ``k``).
    ``rest_samples``: the hook's work outside selection, ``seconds = c + p d h + g W k`` -> ``c``,
    ``h`` (vary ``d``; ``g`` is kept from ``base``). Without them ``h``, ``c`` come from ``base``.
    Least squares on relative error, coefficients >= 0.
    """
    base = CPU_DEFAULT if base is None else base
    if not (pass_s > 0):
        raise ValueError(f"fit_host_costs: pass_s must be > 0, got {pass_s!r}")
    sel = list(select_samples)
    if not sel:
        raise ValueError("fit_host_costs needs selection samples")
    s, q = least_squares([[pass_s * x.d / x.seconds, x.k / x.seconds] for x in sel], [1.0] * len(sel))
    h, c = base.hook_passes, base.call_s
    rest = list(rest_samples)
    if rest:
        rows = [[pass_s * x.d / x.seconds, 1.0 / x.seconds] for x in rest]
        ys = [(x.seconds - base.scatter_s * x.world * x.k) / x.seconds for x in rest]
        h, c = least_squares(rows, ys)
    return HostCosts(pass_s=pass_s, hook_passes=h, select_passes=s, select_per_k_s=q, scatter_s=base.scatter_s,
                     call_s=c, dense_passes=base.dense_passes)  # fmt: skip


# --------------------------------------------------------------------------------------- checks
def _check_world(world: int) -> None:
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be an int >= 1, got {world!r}")


def _check_bucket(d: int, k: int) -> None:
    if isinstance(d, bool) or not isinstance(d, int) or d < 1:
        raise ValueError(f"d must be an int >= 1, got {d!r}")
    if isinstance(k, bool) or not isinstance(k, int) or not (1 <= k <= d):
        raise ValueError(f"k must be an int in [1, d] = [1, {d}], got {k!r}")
