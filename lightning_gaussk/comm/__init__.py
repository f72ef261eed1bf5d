"""Layer 2, communication: how selections cross the ranks.

- :mod:`~lightning_gaussk.comm.codec`: the ``[values | int32 index bits | flag]`` message;
- :mod:`~lightning_gaussk.comm.exchange`: the exchange contract (launch, bytes, time model), the
  all-gather and the dense all-reduce;
- :mod:`~lightning_gaussk.comm.registry`: the exchanges by name (built-in factories listed
  explicitly, ``register_exchange`` for yours);
- :mod:`~lightning_gaussk.comm.sparse_allreduce`, :mod:`~lightning_gaussk.comm.quant`: the bounded
  sparse all-reduce and the quantised all-gather;
- :mod:`~lightning_gaussk.comm.layout`: the job's layout (flat, or nodes of ``L`` ranks);
- :mod:`~lightning_gaussk.comm.vote`: the ranks' vote on that layout;
- :mod:`~lightning_gaussk.comm.topology`: flat, node mode and FSDP2 replicas as process groups;
- :mod:`~lightning_gaussk.comm.inflight`: pending callbacks and the group's teardown at exit.

Imports: :mod:`lightning_gaussk.utils`, :mod:`lightning_gaussk.selection`.
"""
