"""The residual store: per-parameter (or per-shard) residuals and velocities, and their commit.

A *slot* holds the buffers of one key (a DDP bucket, an FSDP2 shard): ``residual`` and ``work``
(``u``), fp32, ``d`` entries (``s`` in node mode: this rank's chunk of every parameter), and with
momentum correction ``velocity`` / ``vel_work``. Each parameter's entries live at
``places[p] = (offset, entries)`` of its slot. When a key's parameters change (DDP's bucket
rebuild after the first iteration), each parameter's residual moves to its new slot, so nothing is
lost; residuals loaded from a checkpoint wait, by parameter name, until their parameter is placed.

Loss scale: a slot's buffers are expressed in the scale ``S_r`` they were committed at
(``slot.scale``, 0-d); the pipeline brings them to the current scale ``S`` when used
(``u = S g + (S / S_r) r``). Read-outs for checkpoints are unscaled (``r / S_r``).

Commit (``sent + residual == u`` per rank, bit for bit), by the one rule of
:mod:`lightning_gaussk.engine.commit`::

    residual := u with the delivered entries zeroed      (sparse exchange)
    residual := 0                                        (everything delivered: dense)
    velocity := vel_work, masked the same way            (momentum correction, DGC)

and neither changes when the flag (the sum of every rank's flag) is non-finite: one bad step
cannot poison the error feedback. On CPU the flag is a host value already; on CUDA the choice is a
``torch.where`` on the device (no host sync).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_gaussk.comm.slot import Slot
from lightning_gaussk.engine.commit import agreed, commit

__all__ = ["ResidualStore"]


class ResidualStore:
    """Residuals (and velocities) of every parameter this rank has seen, by slot key.

    ``names`` (id of a parameter -> name) and ``sizes`` (name -> entries this rank keeps) are set
    by the owner (:meth:`GaussKState.bind`).
    """

    def __init__(self) -> None:
        self.names: dict[int, str] = {}  # id(parameter) -> name
        self.sizes: dict[str, int] = {}  # name -> entries this rank keeps (its chunk in node mode)
        self._slots: dict[Any, Slot] = {}  # key -> buffers
        self._home: dict[int, tuple[Slot, int, int]] = {}  # id(parameter) -> (slot, offset, entries)
        self._pending: dict[str, Tensor] = {}  # loaded residuals, unscaled, not yet placed
        self._pending_velocity: dict[str, Tensor] = {}
        self._ranks: dict[int, int] = {}

    # ---------------------------------------------------------------- read API
    def keys(self) -> list[Any]:
        """The keys (bucket indices) that have a slot."""
        return list(self._slots)

    def slots(self) -> list[Slot]:
        return list(self._slots.values())

    def slot(self, key: Any) -> Slot:
        """The slot of ``key`` (``KeyError`` if it has none yet)."""
        return self._slots[key]

    def __len__(self) -> int:
        return len(self._slots)

    def nbytes(self) -> int:
        """Bytes held by every slot and by loaded-but-unplaced state."""
        pending = [*self._pending.values(), *self._pending_velocity.values()]
        return sum(s.nbytes() for s in self._slots.values()) + sum(t.numel() * t.element_size() for t in pending)

    def ranks(self) -> dict[int, int]:
        """id of a parameter -> its position in the bound model (the canonical order)."""
        if len(self._ranks) != len(self.names):
            self._ranks = {pid: i for i, pid in enumerate(self.names)}
        return self._ranks

    def placed(self) -> set[str]:
        """Names of the parameters whose residual lives in a slot."""
        return {self.names.get(pid, f"<unnamed {pid}>") for pid in self._home}

    def pending(self) -> set[str]:
        """Names of loaded residuals/velocities still waiting for their parameter's first step."""
        return set(self._pending) | set(self._pending_velocity)

    def residuals(self) -> dict[str, Tensor]:
        """Residual per parameter name (views into live buffers, in their slot's loss scale)."""
        return self._views(lambda slot: slot.residual)

    def velocities(self) -> dict[str, Tensor]:
        """Momentum-correction velocity per parameter name (views; empty without it)."""
        return self._views(lambda slot: slot.velocity)

    def scales(self) -> dict[str, Tensor]:
        """The loss scale ``S_r`` (0-d) each parameter's residual and velocity are expressed in."""
        return self._views(lambda slot: slot.scale, whole=True)

    def _views(self, part: Callable[[Slot], Tensor | None], whole: bool = False) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for pid, (slot, off, n) in self._home.items():
            t = part(slot)
            if t is None:
                continue
            if pid not in self.names:
                raise RuntimeError("GaussKState: residuals of unnamed parameters; call state.bind(model) first")
            out[self.names[pid]] = t if whole else t[off : off + n]
        return out

    # ---------------------------------------------------------------- slots
    def slot_for(
        self, key: Any, params: list[Tensor], make: Callable[[tuple[int, ...]], Slot], loss_scale: float, scaled: bool,
        momentum: bool,
    ) -> Slot:
        """The slot of ``key`` for ``params`` (in order); a new one (``make(ids)``) when they
        changed, with each parameter's residual (and, with ``momentum``, velocity) carried over
        from wherever they lived (rescaled to ``loss_scale``), or placed from a loaded checkpoint."""
        ids = tuple(id(p) for p in params)
        slot = self._slots.get(key)
        if slot is not None and slot.key == ids:
            return slot
        new = make(ids)
        new.scale.fill_(loss_scale)
        if momentum:  # the velocity lives beside the residual
            new.velocity = torch.zeros_like(new.residual)
            new.vel_work = torch.empty_like(new.residual)
        for p, (offset, n) in zip(params, new.places):
            home = self._home.get(id(p))
            for buf, pending in ((new.residual, self._pending), (new.velocity, self._pending_velocity)):
                if buf is None:
                    continue
                seg = buf[offset : offset + n]
                old_buf = None if home is None else (home[0].residual if buf is new.residual else home[0].velocity)
                if home is not None and old_buf is not None:
                    old, off, _ = home
                    if scaled:  # the new slot's buffers are in the current loss scale
                        torch.mul(old_buf[off : off + n], loss_scale / old.scale, out=seg)
                    else:
                        seg.copy_(old_buf[off : off + n])
                else:
                    loaded = pending.pop(self.names.get(id(p), ""), None)
                    if loaded is not None:  # saved unscaled
                        torch.mul(loaded.reshape(-1), loss_scale, out=seg)
            self._home[id(p)] = (new, offset, n)
        self._slots[key] = new
        return new

    # ---------------------------------------------------------------- commit
    @staticmethod
    def commit(slot: Slot, indices: Tensor | None, delivered: Tensor | None, flag: Tensor, loss_scale: float, *,
               error_feedback: bool, masking: bool) -> bool:  # fmt: skip
        """Commit one step of ``slot`` by :func:`lightning_gaussk.engine.commit.commit` (see the
        module docstring): ``u`` is ``slot.work`` (and ``slot.vel_work``). ``indices``: this rank's
        selection, None when all of ``u`` was delivered (dense); ``delivered``: bool mask over
        ``indices`` of what reached the update (None: all of it). Returns False when the step was
        skipped on CPU (non-finite ``flag``); on a device the choice stays on the device and True
        is returned."""
        keep_residual, vel = error_feedback, slot.velocity is not None
        if not (keep_residual or vel):
            return True
        ok: bool | Tensor = agreed(flag)  # 0-d on the device: no host sync
        if slot.residual.device.type == "cpu":
            ok = bool(ok)  # a host value already: no sync to avoid
            if not ok:
                return False
        if keep_residual:
            slot.residual, slot.work = commit(slot.residual, slot.work, indices, delivered, ok, everything=indices is None)
        if slot.velocity is not None and slot.vel_work is not None:
            vel_indices = indices if masking else None  # momentum_masking=False: nothing masked
            slot.velocity, slot.vel_work = commit(slot.velocity, slot.vel_work, vel_indices, delivered, ok)
        if ok is True:
            slot.scale.fill_(loss_scale)
        else:
            slot.scale.masked_fill_(ok, loss_scale)
        return True

    # ---------------------------------------------------------------- checkpoint form
    def export(self, scaled: bool) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``(residuals, velocities)``: fp32 CPU copies keyed by parameter name, unscaled
        (``r / S_r``), with loaded-but-unplaced entries included (they are still owed to training)."""
        residuals = {n: r.detach().to("cpu", copy=True) for n, r in self.residuals().items()}
        velocity = {n: v.detach().to("cpu", copy=True) for n, v in self.velocities().items()}
        if scaled:
            scales = self.scales()
            residuals = {n: r.div_(scales[n].cpu()) for n, r in residuals.items()}
            velocity = {n: v.div_(scales[n].cpu()) for n, v in velocity.items()}
        for n, r in self._pending.items():
            residuals.setdefault(n, r.detach().to("cpu", copy=True))
        for n, v in self._pending_velocity.items():
            velocity.setdefault(n, v.detach().to("cpu", copy=True))
        return residuals, velocity

    def validate(self, residuals: dict[str, Any], velocity: dict[str, Any] | None = None) -> None:
        """Check loaded residuals and velocities (tensors, sizes that fit this rank, finite) before
        anything changes. A checkpoint of another layout is converted first
        (:func:`lightning_gaussk.checkpoint.reshard.state_for_layout`): a misfit here is a wrong file."""
        for kind, tensors in (("residual", residuals), ("velocity", velocity or {})):
            for name, tensor in tensors.items():
                if not isinstance(tensor, Tensor):
                    raise ValueError(f"GaussKState.load_state_dict: {kind} {name!r} is a {type(tensor).__name__}, not a tensor")
                if name in self.sizes and tensor.numel() != self.sizes[name]:
                    raise ValueError(
                        f"GaussKState.load_state_dict: {kind} {name!r} has {tensor.numel()} entries, parameter has "
                        f"{self.sizes[name]} on this rank (a checkpoint of another layout? load it through "
                        "lightning_gaussk.checkpoint.reshard, which converts it)"
                    )
                if not bool(torch.isfinite(tensor).all()):
                    raise ValueError(
                        f"GaussKState.load_state_dict: {kind} {name!r} has non-finite entries (corrupted state?); "
                        "refusing to resume error feedback from it"
                    )

    def load(self, residuals: dict[str, Tensor], velocity: dict[str, Any]) -> None:
        """Place loaded (unscaled, :meth:`validate`-d) residuals and velocities: into live slots
        (in their scale), else kept by name until the parameter's slot is made."""
        by_name = {n: pid for pid, n in self.names.items()}
        for name, tensor in residuals.items():
            pid = by_name.get(name)
            home = self._home.get(pid) if pid is not None else None
            if home is not None:
                slot, off, n = home
                if tensor.numel() != n:
                    raise ValueError(f"GaussKState.load_state_dict: residual {name!r} has {tensor.numel()} entries, parameter has {n}")
                torch.mul(tensor.reshape(-1).to(slot.residual), slot.scale, out=slot.residual[off : off + n])  # to S_r
            else:
                if self.names and name not in by_name:
                    raise ValueError(f"GaussKState.load_state_dict: no parameter named {name!r} in the bound model")
                self._pending[name] = tensor.detach().float().reshape(-1)
        self._load_velocity(velocity, by_name)

    def _load_velocity(self, velocity: dict[str, Any], by_name: dict[str, int]) -> None:
        for name, tensor in velocity.items():
            pid = by_name.get(name)
            home = self._home.get(pid) if pid is not None else None
            if home is not None and home[0].velocity is not None:
                slot, off, n = home
                if tensor.numel() != n:
                    raise ValueError(f"GaussKState.load_state_dict: velocity {name!r} has {tensor.numel()} entries, parameter has {n}")
                torch.mul(tensor.reshape(-1).to(slot.velocity), slot.scale, out=slot.velocity[off : off + n])
            else:
                self._pending_velocity[name] = tensor.detach().float().reshape(-1)

