"""TopK-SGD for sharded models: FSDP2 across nodes ("custom HSDP") with :func:`register_gaussk_fsdp`.

Sharded inside a node, replicated across nodes: ``fully_shard`` is 1-D over each node's ``L``
ranks, and the replica reduction across the ``N`` nodes, which native HSDP does with a dense
all-reduce, is the project's sparse exchange instead (torch's ``FSDPModule.set_all_reduce_hook``,
pytorch PR #147114)::

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from lightning_gaussk.fsdp import register_gaussk_fsdp

    mesh = init_device_mesh("cuda", (nodes, gpus_per_node), mesh_dim_names=("replicate", "shard"))
    for block in model.blocks:
        fully_shard(block, mesh=mesh["shard"])
    fully_shard(model, mesh=mesh["shard"])
    state = register_gaussk_fsdp(model, mesh, density=0.01)   # the same options as DDP

One FSDP unit of one step, on local rank ``l`` of node ``n`` (``W = N L`` ranks; ``d``: this
rank's padded shard of the unit)::

    1. FSDP       reduce-scatter inside the node: g = (1/L) sum_{l'} grad_{n,l'}, shard l
    2. the hook   the core entry (pipeline.reduce) with topology Replicas:
                  u = g + r; k = ceil(density d) entries of u; the exchange among the N ranks of
                  local rank l (one per node: the only traffic between nodes), divided by N:
                  update = (1/N) sum_n delivered_n = the mean over all W ranks of what was sent
    3. the flag   a one-word all-reduce inside the node: a non-finite value on any rank skips the
                  commit on every rank and shows in every rank's gradient (as with plain HSDP)
    4. commit     r := u - delivered (per rank, per shard: sent + residual == u, bit for bit)

FSDP then writes the update into the sharded ``.grad`` (cast to the parameters' dtype); the
optimizer steps on shards. Parameters and optimizer states stay sharded: no intra-node all-gather
of the update is needed. Residuals are kept per shard, about ``d / L`` entries of each unit per
rank, keyed by parameter name.

What DDP mode handles, this handles: the mean over all ranks (FSDP's default divide, a mean over
the node, and the hook's ``1/N``); ``MixedPrecisionPolicy(reduce_dtype=...)`` (bf16 or fp32: ``u``
is fp32); gradient accumulation with ``set_requires_gradient_sync(False)`` (FSDP calls the hook
once, on the synchronising micro-batch); a loss scale (:meth:`GaussKState.set_loss_scale`);
warm-up; the dense fallback (priced with the ``L`` ranks of a node sharing its link); telemetry
(``bytes_intra``: FSDP's reduce-scatter and the flag; ``bytes_inter``: the exchange).

Checkpoints (:mod:`lightning_gaussk.checkpoint.protocol`: ``save_fsdp_shards``, ``restore_fsdp_shards``):
every rank writes its own shard with a manifest (:mod:`lightning_gaussk.checkpoint.files`), marked
``sharding = "fsdp2-dim0"``; the same layout resumes exactly. On a
different ``(N, L)`` the new ranks carry the same pending averaged update, per parameter
``P = (1/N) sum_n r_{n,l}`` over the rows of shard ``l``, and rank ``(n', l')`` starts from
``P`` on its rows (so ``(1/N') sum_n' r' = P``), with a warning.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch.distributed as dist
from torch import Tensor, nn

from lightning_gaussk.config import GaussKConfig
from lightning_gaussk.utils.log import rank_zero_info, rank_zero_warn
from lightning_gaussk.engine.describe import fsdp_startup_line
from lightning_gaussk.engine.pipeline import reduce
from lightning_gaussk.engine.state import GaussKState
from lightning_gaussk.comm.topology import Replicas, dim0_shard
from lightning_gaussk.comm.layout import Layout

__all__ = [
    "MESH_DIMS",
    "SHARDING",
    "GaussKFSDPState",
    "fsdp_units",
    "register_gaussk_fsdp",
]

#: the names of the mesh's dimensions: replicas across nodes, shards inside a node
MESH_DIMS = ("replicate", "shard")
#: what an FSDP2 hook state's saved layout says (its residuals are dim-0 row shards)
SHARDING = "fsdp2-dim0"


def _fsdp_module_type() -> type:
    from torch.distributed.fsdp import FSDPModule

    return FSDPModule


class GaussKFSDPState(GaussKState):
    """The hook state of an FSDP2 model (:func:`register_gaussk_fsdp` builds it): a
    :class:`~lightning_gaussk.GaussKState` whose topology is
    :class:`~lightning_gaussk.comm.topology.Replicas` and whose residuals are this rank's dim-0
    shards (``rows[l c, (l + 1) c)``, ``c = ceil(rows / L)``) of each parameter."""

    sharding = SHARDING  # its saves take the row policy on another layout

    def __init__(self, config: GaussKConfig | None = None, **options: Any) -> None:
        super().__init__(config, **options)
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._seen: set[int] = set()  # units reduced in the current backward
        self.units = 0  # FSDP units with parameters (set by register_gaussk_fsdp)

    def bind_mesh(self, model: nn.Module, mesh: Any) -> GaussKFSDPState:
        """Take the layout from ``mesh`` (``(N, L)``, dims :data:`MESH_DIMS`) and the parameter
        names and shapes from ``model``."""
        nodes, per_node = (int(s) for s in mesh.shape)
        layout = Layout(nodes * per_node, dist.get_rank(), per_node)
        self.topology = Replicas(layout, mesh.get_group(MESH_DIMS[1]), mesh.get_group(MESH_DIMS[0]))
        self._layout_ready = True
        self._shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        self.bind(model)
        return self

    def setup_layout(self, launcher_ranks_per_node: int | None = None) -> Layout:
        """The layout comes from the mesh (:meth:`bind_mesh`), not from the launcher."""
        if not self._layout_ready:
            raise RuntimeError("GaussKFSDPState: call register_gaussk_fsdp(model, mesh) (bind_mesh) before the first backward")
        return self.layout

    def _resize(self) -> None:
        """What each parameter keeps on this rank: its real dim-0 shard."""
        sizes = {}
        for name in self._shapes:
            start, stop, _ = dim0_shard(self._shapes[name], self.layout)
            sizes[name] = stop - start
        self.store.sizes = sizes

    def startup_line(self, launcher_rpn: int | None = None) -> str:
        """The line logged once at registration (:func:`~lightning_gaussk.engine.describe.fsdp_startup_line`)."""
        return fsdp_startup_line(self.config, self.layout)

    def unit_backward(self, key: int) -> None:
        """A unit is about to be reduced. A key seen again means a new backward began before the
        previous one was closed (a unit got no gradient): close it first (:meth:`end_backward`)."""
        if key in self._seen:
            self._seen.clear()
            self.end_backward()
        self._seen.add(key)

    def unit_done(self) -> None:
        """A unit was reduced; after the last of the ``units`` of the model, the backward is closed
        (:meth:`end_backward`: monitor requests served, one step counted unless :meth:`set_step`
        is used), as DDP's last bucket does."""
        if len(self._seen) == self.units:
            self._seen.clear()
            self.end_backward()

    # ---------------------------------------------------------------- (de)serialisation
    def state_dict(self) -> dict[str, Any]:
        """:meth:`GaussKState.state_dict`, its layout marked :data:`SHARDING`, with the parameters'
        full shapes (what a change of layout needs to place rows)."""
        out = super().state_dict()
        out["layout"] = {**out["layout"], "sharding": SHARDING}
        out["shapes"] = {n: list(s) for n, s in self._shapes.items()}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Refuse a state not saved from an FSDP2 hook state (its residuals are laid out otherwise),
        then :meth:`GaussKState.load_state_dict`."""
        layout = state_dict.get("layout") if isinstance(state_dict, dict) else None
        if not (isinstance(layout, Mapping) and layout.get("sharding") == SHARDING):
            raise ValueError(
                "GaussKFSDPState.load_state_dict: `state_dict` was not saved by an FSDP2 hook state (register_gaussk_fsdp); "
                "a DDP hook state's residuals are laid out differently and cannot be loaded into sharded parameters"
            )
        super().load_state_dict({**state_dict, "layout": {k: v for k, v in layout.items() if k != "sharding"}})


# ------------------------------------------------------------------------------- registration
def fsdp_units(model: nn.Module) -> list[tuple[str, Any, Any]]:
    """``(name, module, param_group)`` of every ``fully_shard``-ed module of ``model`` that holds
    parameters, in ``model.modules()`` order (the key of each unit is its position)."""
    fsdp_module = _fsdp_module_type()
    units = []
    for name, module in model.named_modules():
        if not isinstance(module, fsdp_module):
            continue
        groups = module._get_fsdp_state()._fsdp_param_groups
        if len(groups) > 1:
            raise ValueError(
                f"register_gaussk_fsdp: module {name or '<root>'!r} has {len(groups)} FSDP parameter groups "
                "(per-parameter meshes, shard_placement_fn); torch's set_all_reduce_hook refuses several groups"
            )
        if groups:
            units.append((name, module, groups[0]))
    return units


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"register_gaussk_fsdp: `model` must be an nn.Module sharded with fully_shard, got {type(model).__name__}")
    if any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules()):
        raise TypeError(
            "register_gaussk_fsdp: `model` is wrapped with FSDP1 (FullyShardedDataParallel); shard it with FSDP2's "
            "torch.distributed.fsdp.fully_shard(module, mesh=mesh['shard'])"
        )
    if not any(isinstance(m, _fsdp_module_type()) for m in model.modules()):
        raise TypeError(
            f"register_gaussk_fsdp: `model` ({type(model).__name__}) is not an FSDP2 model: no module was sharded with "
            "torch.distributed.fsdp.fully_shard (for DDP use gaussk_hook / GaussKDDPStrategy)"
        )


def _check_mesh(mesh: Any) -> None:
    from torch.distributed.device_mesh import DeviceMesh

    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"register_gaussk_fsdp: `mesh` must be a DeviceMesh, got {type(mesh).__name__}")
    if mesh.ndim != 2 or tuple(mesh.mesh_dim_names or ()) != MESH_DIMS:
        raise ValueError(
            f"register_gaussk_fsdp: `mesh` must be 2-D with dims {MESH_DIMS} (nodes, ranks per node), got shape "
            f"{tuple(mesh.shape)} with dims {mesh.mesh_dim_names}; build it with "
            f"init_device_mesh(device, (nodes, ranks_per_node), mesh_dim_names={MESH_DIMS})"
        )
    nodes, per_node = (int(s) for s in mesh.shape)
    if mesh.mesh.flatten().tolist() != list(range(nodes * per_node)) or nodes * per_node != dist.get_world_size():
        raise ValueError(
            f"register_gaussk_fsdp: `mesh` must span the world in node-contiguous order (rank = node * {per_node} + local "
            f"rank), got {mesh.mesh.tolist()}"
        )


def _check_unit(name: str, group: Any, shard_ranks: list[int]) -> None:
    where = f"register_gaussk_fsdp: module {name or '<root>'!r}"
    if getattr(group, "_is_hsdp", False):
        raise ValueError(
            f"{where} is natively 2-D sharded (HSDP: fully_shard over a 2-D mesh), whose dense all-reduce across nodes "
            "would run before the hook; shard it 1-D inside the node: fully_shard(module, mesh=mesh['shard'])"
        )
    pg = group.mesh_info.shard_process_group
    if dist.get_process_group_ranks(pg) != shard_ranks:
        raise ValueError(
            f"{where} is sharded over ranks {dist.get_process_group_ranks(pg)}, not over this node's "
            f"{shard_ranks} (mesh['shard']); shard it with fully_shard(module, mesh=mesh['shard'])"
        )
    for fp in group.fsdp_params:
        if fp.fsdp_placement.dim != 0:
            raise ValueError(f"{where}: a parameter is sharded on dim {fp.fsdp_placement.dim}; only dim-0 sharding is supported")
    _check_divide_factor(name, group)


def _check_divide_factor(name: str, group: Any) -> None:
    if group.gradient_divide_factor is not None:
        raise ValueError(
            f"register_gaussk_fsdp: module {name or '<root>'!r} has set_gradient_divide_factor("
            f"{group.gradient_divide_factor}); the hook makes the update the mean over all ranks itself (FSDP's mean "
            "over the node, then 1/N across nodes), a custom factor would change that: leave it unset"
        )


def register_gaussk_fsdp(model: nn.Module, mesh: Any, config: GaussKConfig | None = None, **options: Any) -> GaussKFSDPState:
    """Set the sparse replica reduction as the all-reduce hook of every FSDP2 unit of ``model``.

    Args:
        model: a module sharded with ``fully_shard(..., mesh=mesh["shard"])`` (1-D inside a node).
        mesh: a 2-D ``DeviceMesh`` with dims ``("replicate", "shard")``: ``(nodes, ranks per node)``.
        config: options as a :class:`~lightning_gaussk.config.GaussKConfig` (or None);
        **options: :class:`~lightning_gaussk.config.GaussKConfig` fields, as for DDP (``density``,
            ``selector``, ``exchange``, ``dense_fallback``, ``warmup_steps``, ...).

    Returns the hook state (telemetry, :meth:`~GaussKState.set_step`,
    :meth:`~GaussKState.set_loss_scale`, checkpoints). Call it on every rank, after sharding and
    before the first backward.
    It logs its startup line on rank 0, and warns on a mesh of one node (nothing crosses nodes).

    Raises ``TypeError`` / ``ValueError`` naming the cause: a model that is not FSDP2; a natively
    2-D-sharded (HSDP) unit; a unit sharded over other ranks than ``mesh["shard"]``; a mesh without
    those dims; a unit with several parameter groups or a custom gradient divide factor; an invalid
    option.
    """
    _check_model(model)
    _check_mesh(mesh)
    if options.get("hierarchy", "auto") == "flat" or options.get("ranks_per_node") is not None:
        raise ValueError("register_gaussk_fsdp: the layout comes from `mesh`; do not pass `hierarchy='flat'` or `ranks_per_node`")
    state = GaussKFSDPState(config, **options).bind_mesh(model, mesh)
    shard_ranks = dist.get_process_group_ranks(mesh.get_group(MESH_DIMS[1]))
    units = fsdp_units(model)
    state.units = len(units)
    for name, _module, group in units:
        _check_unit(name, group, shard_ranks)
    for key, (name, module, group) in enumerate(units):
        params = [fp.sharded_param for fp in group.fsdp_params]
        module.set_all_reduce_hook(_make_hook(state, key, name, params, group))
    rank_zero_info(state.startup_line())
    if state.layout.nodes == 1:
        rank_zero_warn(
            f"register_gaussk_fsdp: the mesh has one node ({state.layout.ranks_per_node} ranks, no replica of a shard on "
            "another node): the sparse replica exchange sends nothing between nodes, and FSDP's reduce-scatter inside the "
            "node is the whole reduction. The hook pays off with 2 or more nodes: mesh (nodes, ranks per node).",
            stacklevel=2,
        )
    return state


def _make_hook(state: GaussKFSDPState, key: int, name: str, params: list[Tensor], group: Any) -> Callable[[Tensor], None]:
    def gaussk_fsdp_hook(reduce_output: Tensor) -> None:
        """The replica reduction of one FSDP unit (steps 2-4 of the module docstring):

        1. a new backward closes the previous one (:meth:`GaussKFSDPState.unit_backward`);
        2. a divide factor set since registration is refused (it would change the mean);
        3. the core entry on the unit's reduce-scatter output, keyed by the unit; its future is
           waited on, since FSDP reads ``reduce_output`` when the hook returns (on CUDA the wait
           orders streams, it does not block the host);
        4. after the model's last unit, the backward is closed."""
        state.unit_backward(key)
        _check_divide_factor(name, group)
        reduce(state, key, params, reduce_output).wait()
        state.unit_done()

    return gaussk_fsdp_hook
