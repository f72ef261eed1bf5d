"""The exchanges by name: built-in factories listed here, and :func:`register_exchange` for yours.

An ``exchange`` option (``GaussKConfig.exchange``, ``SparseLocalSGD(exchange=...)``,
``register_gaussk_fsdp(..., exchange=...)``) names an entry of this registry; every engine gets its
exchange from :func:`get_exchange`, and the cost model prices one by name through it.

Built in (each a factory of no arguments; ``auto``: considered by ``exchange="auto"``):

==============  ==========================================================  ====
name            exchange                                                    auto
==============  ==========================================================  ====
``dense``       :class:`~lightning_gaussk.comm.exchange.DenseAllReduce`      --
``allgather``   :class:`~lightning_gaussk.comm.exchange.AllGather`           yes
``allreduce``   :class:`~lightning_gaussk.comm.sparse_allreduce.SparseAllReduce`  yes
==============  ==========================================================  ====

Not registered: :class:`~lightning_gaussk.comm.quant.QuantAllGather`. Its sizes (``bits``, ``chunk``,
``per_chunk``) are fixed by the driver that builds it, and it decodes only a chunk-wise selection
(entry ``i`` in chunk ``i // per_chunk``), which local SGD's chunk-wise selector produces and the
per-bucket pipeline does not: under a name, ``exchange="quant_allgather"`` would be accepted by the
DDP and FSDP2 options and then mis-decode. Local SGD builds it itself, and the policy prices the
instance (:func:`lightning_gaussk.costs.policy.pick_exchange` takes an exchange object as well as a name).

Example::

    class MyExchange(Exchange): ...                      # launch, message_bytes, volume_bytes
    register_exchange("mine", MyExchange, auto=True)     # now exchange="mine" everywhere, and a
                                                         # candidate of exchange="auto"
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning_gaussk.comm.exchange import AllGather, DenseAllReduce, Exchange
from lightning_gaussk.comm.sparse_allreduce import SparseAllReduce

__all__ = ["auto_exchanges", "available_exchanges", "get_exchange", "register_exchange", "unregister_exchange"]

_FACTORIES: dict[str, Callable[..., Exchange]] = {}
_AUTO: dict[str, None] = {}  # the names exchange="auto" considers, in registration order


def register_exchange(name: str, factory: Callable[..., Exchange], *, auto: bool = False) -> None:
    """Make ``factory`` the exchange named ``name`` (a class, or any callable returning an
    :class:`~lightning_gaussk.comm.exchange.Exchange`; keyword options of :func:`get_exchange` are
    passed to it). A name registered again is replaced.

    ``auto=True`` makes it a candidate of ``exchange="auto"``: it must then build without options
    and implement the cost model (:meth:`~lightning_gaussk.comm.exchange.Exchange.volume_bytes`,
    and :meth:`~lightning_gaussk.comm.exchange.Exchange.time` unless the default fits).

    Raises:
        ValueError: ``name`` is not a non-empty str, or is ``"auto"``.
        TypeError: ``factory`` is not callable.
    """
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"register_exchange: `name` must be a non-empty str other than 'auto', got {name!r}")
    if not callable(factory):
        raise TypeError(f"register_exchange: `factory` must be an Exchange subclass or a callable returning one, got {factory!r}")
    _FACTORIES[name] = factory
    _AUTO.pop(name, None)
    if auto:
        _AUTO[name] = None


def unregister_exchange(name: str) -> None:
    """Remove the exchange registered as ``name`` (``ValueError`` if there is none)."""
    if name not in _FACTORIES:
        raise ValueError(f"unregister_exchange: `name` must be one of {available_exchanges()}, got {name!r}")
    del _FACTORIES[name]
    _AUTO.pop(name, None)


def get_exchange(name: str, **options: Any) -> Exchange:
    """A new instance of the exchange registered as ``name``, built with ``options``.

    Raises:
        ValueError: no exchange is registered as ``name`` (the message lists the choices).
        TypeError: the factory did not return an :class:`~lightning_gaussk.comm.exchange.Exchange`.
    """
    try:
        factory = _FACTORIES[name]
    except (KeyError, TypeError):
        raise ValueError(f"`exchange` must be one of {available_exchanges()}, got {name!r}") from None
    exchange = factory(**options)
    if not isinstance(exchange, Exchange):
        raise TypeError(f"get_exchange: the factory of {name!r} returned {type(exchange).__name__}, not an Exchange")
    return exchange


def available_exchanges() -> list[str]:
    """The registered exchange names, sorted (``"dense"`` is the dense fallback's)."""
    return sorted(_FACTORIES)


def auto_exchanges() -> tuple[str, ...]:
    """The sparse exchanges ``exchange="auto"`` chooses among, in registration order (built in:
    ``("allgather", "allreduce")``; ties of the cost model go to the earlier one)."""
    return tuple(_AUTO)


register_exchange("dense", DenseAllReduce)
register_exchange("allgather", AllGather, auto=True)
register_exchange("allreduce", SparseAllReduce, auto=True)
