"""The one exchange policy: dense or sparse, and which exchange, for every engine.

The DDP hook, the FSDP2 hook and local SGD each call :func:`pick_exchange` once per tensor shape
(``d`` entries, ``k`` selected per peer, ``P`` peers): it prices any registered exchange through
the exchange object itself (:meth:`~lightning_gaussk.comm.exchange.Exchange.volume_bytes`,
:meth:`~lightning_gaussk.comm.exchange.Exchange.time`), so a new exchange is judged by
``dense_fallback="auto"`` and can be chosen by ``exchange="auto"`` without a line here.

**The byte rule** (:func:`byte_rule`): a sparse exchange is ruled out when it moves no fewer bytes
than the dense ring all-reduce. Every rank's wire bytes are ``(P-1)/P`` of the exchange's volume
``V`` (:meth:`~lightning_gaussk.comm.exchange.Exchange.volume_bytes`), so for ``P > 1`` comparing
wire bytes is comparing volumes, ``V_sparse >= V_dense = 8 d``, in integers; for one peer the
volumes still compare (nothing crosses the wire, and the rule is the limit). For the built-in
exchanges it reads::

    "allgather"  4 P (2k + 1) >= 8 d            <=>  P (2k + 1) >= 2d
    "allreduce"  4 P (2c1 + 1 + 2c2 + 1) >= 8 d  <=>  P (c1 + c2 + 1) >= d

**With a link** (:func:`judge`): dense also for one peer, and when the exchange's predicted time
exceeds dense's (ties go to the sparse exchange). **``exchange="auto"``**: of the candidates
(:func:`~lightning_gaussk.comm.registry.auto_exchanges`) that the rule keeps, the fewest wire
bytes without a link, the least predicted time with one (ties to the earlier registered);
dense when none is kept. **``dense_fallback="never"``**: the configured exchange, or for
``"auto"`` the cheapest candidate, never dense.

Every rank must take the same decision (the branches issue different collectives): the functions
are pure in their arguments, so pass configured or broadcast figures, never ones each rank timed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lightning_gaussk.comm.exchange import Exchange
from lightning_gaussk.comm.registry import auto_exchanges, get_exchange
from lightning_gaussk.costs.model import HostCosts, Link, _check_bucket, _check_world, as_exchange, exchange_time

__all__ = ["DENSE_FALLBACKS", "Decision", "byte_rule", "dense_wins", "judge", "pick_exchange"]

DENSE_FALLBACKS = ("auto", "never")


@dataclass(frozen=True)
class Decision:
    """What one bucket (or shard, or outer step) is sent with, and why.

    ``exchange``: the exchange object to launch (the dense all-reduce, or the sparse exchange);
    ``name``: its name (``"dense"``, or the sparse exchange's registered name); ``reason``: the
    rule that decided; ``t_sparse`` / ``t_dense``: the predictions in seconds of the judged sparse
    exchange and of dense (``nan`` when no link was given or nothing was priced)."""

    exchange: Exchange = field(compare=False)  # equal decisions: equal names, reasons and times
    name: str
    reason: str  # "no fewer bytes than dense", "single rank", "sparse slower", "sparse faster", "fewer bytes", ...
    t_sparse: float = math.nan
    t_dense: float = math.nan

    @property
    def dense(self) -> bool:
        """Whether the whole ``u`` is sent (the dense all-reduce)."""
        return not self.exchange.sparse


def byte_rule(exchange: str | Exchange, d: int, k: int, peers: int) -> bool:
    """Whether the sparse ``exchange`` (a registered name or an object) moves no fewer bytes than
    the dense all-reduce: ``V_sparse >= V_dense`` (the module docstring; in integers)."""
    _check_bucket(d, k)
    _check_world(peers)
    return as_exchange(exchange).volume_bytes(k, d, peers) >= get_exchange("dense").volume_bytes(k, d, peers)


def judge(exchange: str | Exchange, d: int, k: int, peers: int, link: Link | None = None, host: HostCosts | None = None,
          share: int = 1) -> Decision:  # fmt: skip
    """The rule for one sparse ``exchange`` against dense, with its reason and both predictions.

    ``d`` entries (node mode: the shard), ``k`` selected per peer, ``peers`` = ``P`` ranks that
    exchange (flat mode: ``W``; node mode: ``N`` nodes), ``share`` = exchanges sharing one link
    (node mode: ``G`` ranks per node on the node's NIC; only the time model uses it).

    1. The byte rule (:func:`byte_rule`): dense when the exchange moves no fewer bytes.
    2. With a ``link``: dense also for one peer, and when the exchange's time
       (:func:`~lightning_gaussk.costs.model.exchange_time`; ``host`` defaults to
       :data:`~lightning_gaussk.costs.model.CPU_DEFAULT`) exceeds dense's (ties go to sparse).
    """
    _check_world(share)
    sparse = as_exchange(exchange)
    name = _name(exchange, sparse)
    if not sparse.sparse:
        raise ValueError(f"judge: `exchange` must be a sparse exchange, got {name!r}")
    dense = get_exchange("dense")
    t_sparse = t_dense = math.nan
    if link is not None:
        t_sparse = exchange_time(sparse, d, k, peers, link, host, share)
        t_dense = exchange_time(dense, d, k, peers, link, host, share)
    if link is not None and peers == 1:
        return Decision(dense, "dense", "single rank", t_sparse, t_dense)
    if byte_rule(sparse, d, k, peers):
        return Decision(dense, "dense", "no fewer bytes than dense", t_sparse, t_dense)
    if link is None:
        return Decision(sparse, name, "fewer bytes", t_sparse, t_dense)
    if t_sparse > t_dense:
        return Decision(dense, "dense", "sparse slower", t_sparse, t_dense)
    return Decision(sparse, name, "sparse faster", t_sparse, t_dense)


def dense_wins(d: int, k: int, peers: int, link: Link | None = None, host: HostCosts | None = None,
               exchange: str | Exchange = "allgather", share: int = 1) -> bool:  # fmt: skip
    """Whether :func:`judge` sends the bucket dense rather than through the sparse ``exchange``
    (``dense_fallback="auto"`` with a configured exchange)."""
    return judge(exchange, d, k, peers, link, host, share).dense


def pick_exchange(d: int, k: int, peers: int, link: Link | None = None, host: HostCosts | None = None, share: int = 1,
                  *, exchange: str | Exchange = "auto", dense_fallback: str = "auto") -> Decision:  # fmt: skip
    """THE policy: what a tensor of ``d`` entries, ``k`` selected per peer, among ``peers`` is sent
    with (arguments as :func:`judge`).

    - ``exchange``: a registered name, an exchange object (e.g. local SGD's quantised all-gather),
      or ``"auto"``: the candidates of :func:`~lightning_gaussk.comm.registry.auto_exchanges`;
    - ``dense_fallback="auto"``: each candidate is judged (:func:`judge`); of those kept, the fewest
      wire bytes (no link) or the least time (a link) wins, ties to the earlier; dense when none
      is kept. So ``pick_exchange(..., exchange=e).dense == dense_wins(..., exchange=e)``;
    - ``dense_fallback="never"``: the exchange as given, or for ``"auto"`` the cheapest candidate
      by the same measure, never dense by the rule.

    A dense ``exchange`` (``"dense"``) is sent dense. A pure function of its arguments.

    Raises:
        ValueError: ``dense_fallback`` is not ``"auto"`` or ``"never"``, ``exchange`` is not
            registered, or a size is out of range (naming it).
    """
    if dense_fallback not in DENSE_FALLBACKS:
        raise ValueError(f"pick_exchange: `dense_fallback` must be one of {DENSE_FALLBACKS}, got {dense_fallback!r}")
    _check_bucket(d, k)
    _check_world(peers)
    _check_world(share)
    if isinstance(exchange, str) and exchange == "auto":
        specs: list[str | Exchange] = list(auto_exchanges())
        if not specs:
            raise ValueError("pick_exchange: `exchange` is 'auto' but no exchange is registered with auto=True")
    else:
        given = as_exchange(exchange)
        if not given.sparse:
            return Decision(given, _name(exchange, given), "dense configured")
        if dense_fallback == "never":
            return Decision(given, _name(exchange, given), "dense_fallback='never'")
        specs = [given if not isinstance(exchange, str) else exchange]
    if dense_fallback == "never":
        kept = []
        for spec in specs:
            obj = as_exchange(spec)
            t = math.nan if link is None else exchange_time(obj, d, k, peers, link, host, share)
            kept.append(Decision(obj, _name(spec, obj), "dense_fallback='never'", t))
    else:
        judged = [judge(spec, d, k, peers, link, host, share) for spec in specs]
        kept = [j for j in judged if not j.dense]
        if not kept:
            return judged[0] if len(judged) == 1 else Decision(get_exchange("dense"), "dense", "no sparse exchange is cheaper")
    if link is None:
        return min(kept, key=lambda j: j.exchange.wire_bytes(k, d, peers))
    return min(kept, key=lambda j: j.t_sparse)


def _name(spec: str | Exchange, exchange: Exchange) -> str:
    """The registered name given, or the object's class name attribute."""
    return spec if isinstance(spec, str) else exchange.name
