"""The alpha-beta cost model of one gradient bucket's communication: links, host costs, and the
bytes and times of every registered exchange. Pure functions of plain numbers (no torch); the
rule that uses them is :mod:`~lightning_gaussk.costs.policy`, and hierarchical times, step times
and fitting are :mod:`~lightning_gaussk.costs.planning`.

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

Exchanges (``P`` peers, a bucket or shard of ``d`` entries, ``k`` selected per peer): each
registered exchange (:mod:`lightning_gaussk.comm.registry`) states its own bytes and time
(:meth:`~lightning_gaussk.comm.exchange.Exchange.wire_bytes`,
:meth:`~lightning_gaussk.comm.exchange.Exchange.time` on a :class:`Pricing`);
:func:`exchange_bytes` and :func:`exchange_time` read them by name. The built-in ones (bytes one
peer sends, = receives)::

    "dense"      ring all-reduce               B = 2 (P-1)/P * 4 d   (whole bytes)
    "allgather"  ring all-gather of k pairs    B = (P-1) * 4 (2k + 1)                grows with P
    "allreduce"  bounded sparse all-reduce     B = (P-1) * 4 (2 c1 + 1) + (P-1) * 4 (2 c2 + 1)
                 stage 1: all_to_all_single, per-peer chunks of (2 c1 + 1) words, c1 = min(ceil(3k/2P), ceil(d/P))
                 stage 2: all-gather of (2 c2 + 1) words per peer,             c2 = c1
                 so B <= 4 (P-1) (6k/P + 6): 6 words per selected entry, (P-1)/P of it, + 6 per peer

with times (``beta' = G / bandwidth`` when ``share = G`` exchanges use one link)::

    "dense"      H_d + 2 (P-1) alpha + 2 (P-1)/P 4d beta'
    "allgather"  H_s + (P-1) alpha + (P-1) 4 (2k+1) beta'
    "allreduce"  H_s + g P (c1 + c2 - k) + p (d/P) (1 + s) + q c2        (region: zero, scatter, select)
                     + 2 (P-1) alpha + (P-1) 4 (2 c1 + 2 c2 + 2) beta'   (all-to-all, then all-gather)

Usage::

    from lightning_gaussk.costs.model import HostCosts, Link, exchange_bytes, exchange_time
    link = Link.from_gbit(10.0)                       # or Link(alpha=..., bandwidth=...) from a fit
    host = HostCosts.for_device("cpu")                # or "cuda"; or fitted
    exchange_bytes("allreduce", d, k, peers)          # any registered name
    exchange_time("allgather", d, k, peers, link, host, share=1)
"""

import math
from dataclasses import dataclass

from lightning_gaussk.comm.exchange import AllGather, Exchange
from lightning_gaussk.comm.registry import get_exchange

__all__ = [
    "BYTES_PER_ENTRY",
    "COMM_ONLY",
    "CPU_DEFAULT",
    "HostCosts",
    "Link",
    "Pricing",
    "allgather_time",
    "as_exchange",
    "allreduce_time",
    "bucket_k",
    "dense_bucket_time",
    "dense_host_time",
    "exchange_bytes",
    "exchange_time",
    "sparse_bucket_time",
    "sparse_host_time",
    "sparse_message_bytes",
    "wire_bytes",
]

BYTES_PER_ENTRY = 4  # fp32 values; int32 indices ride in the same fp32 message


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
        return float(AllGather().wire_bytes(k, d, world))
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
#: no host work: with it a prediction is communication only (alpha-beta terms of the collectives)
COMM_ONLY = HostCosts(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


def sparse_host_time(d: int, k: int, world: int, host: HostCosts) -> float:
    """``H_s = c + p d (h + s) + q k + g W k``."""
    return host.call_s + host.pass_s * d * (host.hook_passes + host.select_passes) + host.select_per_k_s * k + host.scatter_s * world * k


def dense_host_time(d: int, host: HostCosts) -> float:
    """``H_d = p d r_d``."""
    return host.pass_s * d * host.dense_passes


@dataclass(frozen=True)
class Pricing:
    """The cost model as an exchange's time model reads it
    (:class:`lightning_gaussk.comm.exchange.Pricing`): ``link`` as the exchange sees it and the
    ``host`` costs. :meth:`on` builds it for ``share`` exchanges on one link (node mode: the ``G``
    ranks of a node on its NIC, each seeing ``bandwidth / G``)."""

    link: Link
    host: HostCosts = CPU_DEFAULT

    @classmethod
    def on(cls, link: Link, host: HostCosts | None = None, share: int = 1) -> "Pricing":
        """``link`` shared by ``share`` exchanges (``beta' = share / bandwidth``); ``host`` defaults
        to :data:`CPU_DEFAULT`."""
        _check_world(share)
        return cls(Link(link.alpha, link.bandwidth / share), CPU_DEFAULT if host is None else host)

    @property
    def alpha(self) -> float:
        return self.link.alpha

    @property
    def beta(self) -> float:
        return self.link.beta

    def sparse_host(self, d: int, k: int, peers: int) -> float:
        """:func:`sparse_host_time`."""
        return sparse_host_time(d, k, peers, self.host)

    def dense_host(self, d: int) -> float:
        """:func:`dense_host_time`."""
        return dense_host_time(d, self.host)

    def allreduce(self, nbytes: float, peers: int) -> float:
        """:func:`allreduce_time` on this link."""
        return allreduce_time(nbytes, peers, self.link)


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
def as_exchange(exchange: "str | Exchange") -> Exchange:
    """``exchange`` itself, or a new instance of the exchange registered under that name."""
    return exchange if isinstance(exchange, Exchange) else get_exchange(exchange)


def exchange_bytes(exchange: "str | Exchange", d: int, k: int, peers: int) -> float:
    """Bytes one peer sends (= receives) per bucket of ``d`` entries, ``k`` selected, ``P`` peers,
    through ``exchange`` (a registered name or an exchange object): its
    :meth:`~lightning_gaussk.comm.exchange.Exchange.wire_bytes`, e.g.::

        "dense"      ceil(2 (P-1)/P * 4 d)
        "allgather"  (P-1) * 4 (2k + 1)
        "allreduce"  (P-1) * 4 (2 c1 + 1) + (P-1) * 4 (2 c2 + 1)     (c1, c2: bounded_chunks)

    Flat mode: ``P = W`` ranks. Node mode's inter-node stage: the shard ``s = ceil(d/G)``, its
    ``k_s`` and ``P = N`` nodes (per GPU; a node's NIC carries ``G`` times this)."""
    _check_bucket(d, k)
    _check_world(peers)
    return float(as_exchange(exchange).wire_bytes(k, d, peers))


def exchange_time(exchange: "str | Exchange", d: int, k: int, peers: int, link: Link, host: HostCosts | None = None,
                  share: int = 1) -> float:  # fmt: skip
    """Predicted seconds of one bucket through ``exchange`` (a registered name or an exchange
    object), host work included: its :meth:`~lightning_gaussk.comm.exchange.Exchange.time` on
    :meth:`Pricing.on` ``(link, host, share)`` (``host`` defaults to :data:`CPU_DEFAULT`; ``share``
    exchanges on one link, as node mode's ``G`` ranks on a NIC; 1 in flat mode). The built-in
    formulas are in the module docstring."""
    _check_bucket(d, k)
    _check_world(peers)
    return as_exchange(exchange).time(k, d, peers, Pricing.on(link, host, share))


# --------------------------------------------------------------------------------------- checks
def _check_world(world: int) -> None:
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be an int >= 1, got {world!r}")


def _check_bucket(d: int, k: int) -> None:
    if isinstance(d, bool) or not isinstance(d, int) or d < 1:
        raise ValueError(f"d must be an int >= 1, got {d!r}")
    if isinstance(k, bool) or not isinstance(k, int) or not (1 <= k <= d):
        raise ValueError(f"k must be an int in [1, d] = [1, {d}], got {k!r}")
