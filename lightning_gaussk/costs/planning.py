"""Planning with the cost model: node-mode and FSDP2 times, whole training steps, and fitting the
model's parameters to measurements. Used by the pre-flight check and the benchmarks; the engines
need none of it.

- :func:`bucket_time`: one bucket as the hook sends it (the policy's choice, priced);
- :func:`hierarchical_bucket_time`, :func:`hsdp_unit_time`: node mode (``N`` nodes of ``G`` GPUs,
  ``P = N G`` ranks): dense intra-node reduce-scatter, the inter-node exchange of each GPU's shard
  (``s = ceil(d/G)`` entries, ``k_s = bucket_k(density, s)``) among the ``N`` GPUs with the same
  local rank, the node's NIC shared by its ``G`` GPUs (``share=G``: each sees ``bandwidth / G``),
  then (node mode) the dense intra-node all-gather;
- :class:`Workload`, :func:`step_time`: a training step (``C`` = compute-only step time of one
  rank; ``overlap`` = communication hidden behind the backward pass, 0 by default)::

      T_step = C + sum_b H_b + max(0, sum_b T_b - overlap)

- :func:`least_squares`, :class:`Sample` / :func:`fit_link` (alpha and beta from timed
  collectives), :class:`HostSample` / :func:`fit_host_costs` (the host costs from timed calls);
- :func:`spread`: ``(min, median, max)`` of repeated measurements (the pre-flight's links);
- :func:`local_outer_cost`, :func:`plan_local_sgd`: sparse local SGD's outer exchange priced on
  measured links, and the ``gaussk_local`` settings that keep it hidden behind inner steps.
"""

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from lightning_gaussk.comm.quant import QuantAllGather
from lightning_gaussk.costs.model import (
    BYTES_PER_ENTRY,
    COMM_ONLY,
    CPU_DEFAULT,
    HostCosts,
    Link,
    Pricing,
    _check_world,
    allgather_time,
    allreduce_time,
    bucket_k,
    dense_host_time,
    exchange_time,
    sparse_host_time,
    sparse_message_bytes,
)
from lightning_gaussk.costs.policy import dense_wins, pick_exchange

__all__ = [
    "LOCAL_CHUNK",
    "LOCAL_LADDER",
    "HostSample",
    "LocalPlan",
    "OuterCost",
    "Sample",
    "Workload",
    "bucket_time",
    "fit_host_costs",
    "fit_link",
    "hierarchical_bucket_time",
    "hsdp_unit_time",
    "least_squares",
    "local_outer_cost",
    "plan_local_sgd",
    "spread",
    "step_time",
]


# --------------------------------------------------------------------------------------- buckets
def bucket_time(d: int, k: int, peers: int, link: Link, host: HostCosts | None = None, exchange: str = "allgather",
                share: int = 1) -> float:  # fmt: skip
    """Predicted seconds of one bucket as the hook sends it with the dense fallback on: the
    :func:`~lightning_gaussk.costs.model.exchange_time` of what
    :func:`~lightning_gaussk.costs.policy.pick_exchange` sends (``exchange``: a registered name or
    ``"auto"``; ``"dense"`` is always dense)."""
    sent = pick_exchange(d, k, peers, link, host, share, exchange=exchange).exchange
    return exchange_time(sent, d, k, peers, link, host, share)


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
    ceil(density d)`` per bucket, the all-gather). ``auto=True`` with ``"sparse"`` sends each bucket
    dense where :func:`~lightning_gaussk.costs.policy.dense_wins` says so.
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


# --------------------------------------------------------------------------------------- spread
def spread(values: Iterable[float]) -> tuple[float, float, float]:
    """``(min, median, max)`` of repeated measurements (at least one)."""
    vals = sorted(values)
    if not vals:
        raise ValueError("spread needs at least one value")
    return vals[0], statistics.median(vals), vals[-1]


# --------------------------------------------------------------------------------------- local SGD
#: entries per chunk of the outer step's chunk-wise top-k (``LocalSGDConfig.chunk``'s default); the
#: planner prices the engine's own sizes with it
LOCAL_CHUNK = 4096

#: ``(sync_every H, density, quantize bits)`` in order of preference: the settings measured best in
#: docs/local-sgd.md (density 0.02, 2-bit values; ``H = 16`` had the best loss, ``H = 32`` half the
#: bytes per inner step and twice the inner steps to hide the exchange behind). ``H = 8`` is not on
#: it: it measured worse than ``H = 16`` at twice the bytes; pass a ladder of your own to price it.
LOCAL_LADDER: tuple[tuple[int, float, int | None], ...] = ((16, 0.02, 2), (32, 0.02, 2))


@dataclass(frozen=True)
class OuterCost:
    """One outer step of sparse local SGD on one measurement of the links (the sizes are the
    engine's: :class:`~lightning_gaussk.engine.local.fragment.Sizes`).

    Attributes:
        exchange: the exchange the engine would use (``"quant_allgather"``, ``"allgather"``, or
            ``"dense"`` where the byte rule sends the step dense).
        k, m, peers: entries sent per outer step, entries of this rank's padded buffer, peers.
        message_bytes: bytes of this rank's message per outer step
            (``SparseLocalSGD.outer_bytes``).
        background_s: seconds of the exchange between the peers (it can run while inner steps
            go on, ``overlap_steps``).
        blocking_s: node mode's intra-node reduce-scatter and all-gather around it, which the
            outer step waits on (0 in flat mode).
    """

    exchange: str
    k: int
    m: int
    peers: int
    message_bytes: int
    background_s: float
    blocking_s: float


def local_outer_cost(numels: Sequence[int], density: float, quantize: int | None, peers: int, link: Link, *,
                     gpus_per_node: int = 1, intra: Link | None = None, chunk: int = LOCAL_CHUNK) -> OuterCost:  # fmt: skip
    """Sparse local SGD's outer exchange (``outer="sparse"``, chunk-wise top-k) for a model of
    parameters ``numels``, priced as the engine sends it, communication only (the selection's host
    work is not counted, as in ``SparseLocalSGD.predicted_outer_time``).

    Flat (``gpus_per_node = 1``): this rank holds ``d_loc = d = sum(numels)`` entries and exchanges
    among ``peers = W`` ranks on ``link``. Node mode (``G = gpus_per_node > 1``): it holds its
    chunk of every parameter, ``d_loc = s = sum_p ceil(n_p / G)``, exchanges among ``peers = N``
    nodes on ``link`` shared by the ``G`` ranks of its node, and the node's reduce-scatter and
    all-gather run on ``intra``. Sizes (``C = min(chunk, d_loc)``)::

        n = ceil(d_loc / C),  kc = bucket_k(density, C),  k = n kc,  m = n C
        exchange = QuantAllGather(quantize, C, kc) (quantize given) or "allgather",
                   dense where the byte rule says so (pick_exchange, dense_fallback="auto")
        T  = exchange.time(k, m, P) on Pricing.on(link, COMM_ONLY, share=G)
           = (P-1) alpha + (P-1) * message_bytes * G beta         (an all-gather)
        B  = 2 (G-1) alpha + (G-1) 4 (2 s + 1) beta_intra           (node mode; 0 flat)

    In flat mode ``T`` is exactly ``SparseLocalSGD.predicted_outer_time(link)``."""
    _check_world(peers)
    _check_world(gpus_per_node)
    if not numels or any(n < 0 for n in numels) or sum(numels) < 1:
        raise ValueError(f"local_outer_cost: numels must hold at least one entry, got {list(numels)[:4]}...")
    if not 0 < density <= 1:
        raise ValueError(f"local_outer_cost: density must be in (0, 1], got {density!r}")
    g = gpus_per_node
    if g > 1 and intra is None:
        raise ValueError("local_outer_cost: node mode (gpus_per_node > 1) needs the intra-node link")
    d_loc = sum(math.ceil(n / g) for n in numels) if g > 1 else sum(numels)
    c = min(chunk, d_loc)
    n_chunks = -(-d_loc // c)
    kc = bucket_k(density, c)
    k, m = n_chunks * kc, n_chunks * c
    sparse: Any = QuantAllGather(quantize, c, kc) if quantize is not None else "allgather"
    ex = pick_exchange(m, k, peers, exchange=sparse, dense_fallback="never" if peers == 1 else "auto").exchange
    message = ex.message_bytes(k, m, peers)
    background = 0.0 if peers == 1 or message == 0 else ex.time(k, m, peers, Pricing.on(link, COMM_ONLY, share=g))
    blocking = 0.0
    if g > 1:
        assert intra is not None
        blocking = _half_ring(g * d_loc, g, intra) + _half_ring(g * (d_loc + 1), g, intra)
    return OuterCost(ex.name, k, m, peers, message, background, blocking)


@dataclass(frozen=True)
class LocalPlan:
    """One setting of sparse local SGD priced on the measured links (:func:`plan_local_sgd`).

    ``background_s``: ``(min, median, max)`` of the exchange's time over the link measurements;
    ``blocking_s``: the largest of node mode's blocking intra-node time; ``overlap_steps``,
    ``exposed_s`` and ``hidden`` are None without a step time."""

    sync_every: int
    density: float
    quantize: int | None
    exchange: str
    message_bytes: int
    dense_bytes_per_step: int
    background_s: tuple[float, float, float]
    blocking_s: float
    overlap_steps: int | None
    exposed_s: float | None
    hidden: bool | None

    @property
    def bytes_per_inner_step(self) -> float:
        """Message bytes per optimizer step on average: ``message_bytes / H``."""
        return self.message_bytes / self.sync_every

    @property
    def fewer_bytes(self) -> float:
        """How many times fewer bytes per step than DDP's dense all-reduce (``4 d`` per step)."""
        return self.dense_bytes_per_step / self.bytes_per_inner_step if self.message_bytes else math.inf

    def kwargs(self) -> dict[str, Any]:
        """``gaussk_local`` keyword arguments (``GaussKLocalSGDStrategy(**plan.kwargs())``);
        ``overlap_steps`` only with a step time."""
        out: dict[str, Any] = {"sync_every": self.sync_every, "density": self.density, "quantize": self.quantize}
        if self.overlap_steps is not None:
            out["overlap_steps"] = self.overlap_steps
        return out


def plan_local_sgd(numels: Sequence[int], peers: int, links: Sequence[Link], step_s: float | None, *,
                   gpus_per_node: int = 1, intras: Sequence[Link | None] | None = None,
                   ladder: Sequence[tuple[int, float, int | None]] = LOCAL_LADDER,
                   chunk: int = LOCAL_CHUNK) -> tuple[LocalPlan | None, list[LocalPlan]]:  # fmt: skip
    """The ``gaussk_local`` settings that keep the outer exchange hidden behind inner steps.

    ``links``: the exchange's link as measured, once per repeat (``intras``: node mode's
    intra-node link of the same repeats); ``step_s``: the job's time per optimizer step ``t``
    (forward, backward, optimizer, no communication). For each rung ``(H, density, bits)`` of
    ``ladder``, with :func:`local_outer_cost` on every measurement ``i``::

        T   = max_i T_i          the exchange's time at the pessimistic end of the spread
        B   = max_i B_i          node mode's blocking intra-node stages (0 flat)
        tau = ceil(T / t)        inner steps the exchange runs behind (0 when T = 0)
        hidden   <=>  tau <= H - 1            (overlap_steps must stay below H)
        exposed per window   E = B + max(0, T - min(tau, H - 1) t)
        bytes per inner step     message_bytes / H     against DDP's 4 d per step

    The choice: the first hidden rung of ``ladder`` (its order is the preference: the least
    compression that still hides the exchange), with ``overlap_steps = tau``; when none is hidden,
    the rung with the least ``E`` (ties: the later rung, fewer bytes) with ``overlap_steps = H - 1``.
    Without ``step_s`` nothing is chosen (the rungs carry ``T`` and the bytes). Returns
    ``(choice or None, every rung priced)``."""
    if not links:
        raise ValueError("plan_local_sgd needs at least one measured link")
    if step_s is not None and not (step_s > 0 and math.isfinite(step_s)):
        raise ValueError(f"plan_local_sgd: step_s must be a number > 0 (seconds), got {step_s!r}")
    if intras is not None and len(intras) != len(links):
        raise ValueError("plan_local_sgd: intras must pair with links, one per measurement")
    dense_bytes = BYTES_PER_ENTRY * sum(numels)
    plans: list[LocalPlan] = []
    for h, rho, bits in ladder:
        if isinstance(h, bool) or not isinstance(h, int) or h < 1:
            raise ValueError(f"plan_local_sgd: sync_every must be an int >= 1, got {h!r}")
        costs = [local_outer_cost(numels, rho, bits, peers, link, gpus_per_node=gpus_per_node,
                                  intra=None if intras is None else intras[i], chunk=chunk)
                 for i, link in enumerate(links)]  # fmt: skip
        t_bg = spread(c.background_s for c in costs)
        blocking = max(c.blocking_s for c in costs)
        tau = exposed = hidden = None
        if step_s is not None:
            need = math.ceil(t_bg[2] / step_s - 1e-9) if t_bg[2] > 0 else 0
            hidden = need <= h - 1
            tau = min(need, h - 1)
            exposed = blocking + max(0.0, t_bg[2] - tau * step_s)
        plans.append(LocalPlan(h, rho, bits, costs[0].exchange, costs[0].message_bytes, dense_bytes, t_bg, blocking, tau,
                               exposed, hidden))  # fmt: skip
    if step_s is None:
        return None, plans
    hidden_plans = [p for p in plans if p.hidden]
    if hidden_plans:
        return hidden_plans[0], plans
    best = min(range(len(plans)), key=lambda i: (plans[i].exposed_s, -i))
    return plans[best], plans
