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

For nodes of ``G`` GPUs (``N`` nodes, ``P = N G`` ranks), :func:`hierarchical_bucket_time` models
dense intra-node reduce-scatter, sparse inter-node all-gather of each GPU's shard among the ``N``
GPUs with the same local rank (the node's NIC shared by its ``G`` GPUs), decode, then dense
intra-node all-gather.

Hook API (what ``dense_fallback="auto"`` calls)::

    from lightning_gaussk.costmodel import Link, HostCosts, prefer_dense
    link = Link.from_gbit(10.0)                       # or Link(alpha=..., bandwidth=...) from a fit
    host = HostCosts.for_device("cpu")                # or "cuda"; or fitted
    if prefer_dense(d, k, world, link, host):         # memoise per (d, k, world): it is pure
        ...send this bucket dense...
    decide(d, k, world, link, host).reason           # for telemetry

Every rank must take the same decision (dense all-reduce and sparse all-gather are different
collectives: ranks that disagree hang or mismatch). The functions are pure, so equal arguments on
every rank suffice: pass configured or broadcast parameters, never figures each rank timed itself.
"""

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "BYTES_PER_ENTRY",
    "CPU_DEFAULT",
    "Decision",
    "HostCosts",
    "HostSample",
    "Link",
    "Sample",
    "Workload",
    "allgather_time",
    "allreduce_time",
    "bucket_k",
    "byte_rule_dense",
    "decide",
    "dense_bucket_time",
    "dense_host_time",
    "fit_host_costs",
    "fit_link",
    "hierarchical_bucket_time",
    "least_squares",
    "prefer_dense",
    "sparse_bucket_time",
    "sparse_host_time",
    "sparse_message_bytes",
    "step_time",
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
        return (world - 1) * sparse_message_bytes(k)
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
    """Predicted seconds for one bucket sent sparse: ``H_s + T_ag(4 (2k+1))``."""
    _check_bucket(d, k)
    return sparse_host_time(d, k, world, host) + allgather_time(sparse_message_bytes(k), world, link)


def dense_bucket_time(d: int, world: int, link: Link, host: HostCosts, bytes_per_entry: int = BYTES_PER_ENTRY) -> float:
    """Predicted seconds for one bucket all-reduced dense: ``H_d + T_ar(bytes_per_entry * d)``."""
    _check_bucket(d, 1)
    return dense_host_time(d, host) + allreduce_time(bytes_per_entry * d, world, link)


@dataclass(frozen=True)
class Decision:
    """Outcome of :func:`decide`: ``dense`` and why, with both predictions (seconds)."""

    dense: bool
    reason: str  # "world*(2k+1) >= 2d", "single rank", "sparse slower", "sparse faster"
    t_sparse: float
    t_dense: float


def bucket_k(density: float, d: int) -> int:
    """Entries sent from a bucket (or shard) of ``d`` entries: ``ceil(density * d)`` clamped to
    ``[1, d]`` (the ``- 1e-9`` keeps ``0.01 * 300`` at 3 despite rounding). The one formula of k,
    used by the hook, the monitor and this model (here, so that this module stays pure)."""
    return min(d, max(1, math.ceil(density * d - 1e-9)))


def byte_rule_dense(d: int, k: int, world: int) -> bool:
    """The one byte rule of the dense fallback: ``W (2k + 1) >= 2d``, i.e. the sparse all-gather
    (``(W-1)(2k+1)`` entries received per rank) moves no fewer bytes than a ring all-reduce
    (``2 (W-1)/W d``). ``world`` is the number of ranks that exchange messages: ``W`` in flat
    mode, the number of nodes ``N`` in node mode (each shard of ``d`` entries then)."""
    return world * (2 * k + 1) >= 2 * d


def decide(d: int, k: int, world: int, link: Link, host: HostCosts | None = None) -> Decision:
    """Whether a bucket of ``d`` entries, ``k`` of them selected, is predicted faster dense.

    Dense whenever :func:`byte_rule_dense` holds (``W (2k + 1) >= 2d``) or ``W == 1``;
    otherwise whichever of :func:`sparse_bucket_time` and :func:`dense_bucket_time` is smaller
    (ties go to sparse).
    """
    host = CPU_DEFAULT if host is None else host
    _check_bucket(d, k)
    _check_world(world)
    t_dense = dense_bucket_time(d, world, link, host)
    t_sparse = sparse_bucket_time(d, k, world, link, host)
    if world == 1:
        return Decision(True, "single rank", t_sparse, t_dense)
    if byte_rule_dense(d, k, world):
        return Decision(True, "world*(2k+1) >= 2d", t_sparse, t_dense)
    if t_sparse > t_dense:
        return Decision(True, "sparse slower", t_sparse, t_dense)
    return Decision(False, "sparse faster", t_sparse, t_dense)


def prefer_dense(d: int, k: int, world: int, link: Link, host: HostCosts | None = None) -> bool:
    """``True`` when bucket (``d`` entries, ``k`` sent per rank, ``world`` ranks) should be sent
    dense: ``W (2k+1) >= 2d``, or the sparse path is predicted slower (see :func:`decide`)."""
    return decide(d, k, world, link, host).dense


# --------------------------------------------------------------------------------------- hierarchy
def hierarchical_bucket_time(d: int, density: float, nodes: int, gpus_per_node: int, intra: Link, inter: Link,
                             host: HostCosts) -> float:  # fmt: skip
    """Dense intra-node + sparse inter-node, per bucket (``N`` nodes of ``G`` GPUs)::

        T = T_rs^intra(4d, G)                      reduce-scatter: each GPU owns d/G summed entries
          + H_s(d/G, k_G, N) + T_ag^inter(k_G, N)  k_G = ceil(density d / G); NIC shared by G GPUs
          + T_ag^intra(4d/G, G)                    all-gather of the decoded dense shards

    with ``T_rs = T_ag^dense = (G-1) alpha + (G-1)/G * 4d * beta`` (half a ring all-reduce each) and
    the inter-node link's bandwidth divided by ``G``.
    """
    _check_world(nodes)
    _check_world(gpus_per_node)
    g = gpus_per_node
    shard = math.ceil(d / g)
    k = bucket_k(density, shard)
    half_ring = (g - 1) * intra.alpha + (g - 1) / g * BYTES_PER_ENTRY * d * intra.beta if g > 1 else 0.0
    shared = Link(inter.alpha, inter.bandwidth / g)
    inter_t = sparse_bucket_time(shard, k, nodes, shared, host) if nodes > 1 else 0.0
    return half_ring + inter_t + half_ring


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
                if auto and decide(d, k, world, link, host).dense:
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
