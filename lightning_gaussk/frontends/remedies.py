"""Optimizer remedies for TopK-SGD: what error feedback needs from the optimizer.

Error feedback delays the part of a gradient that is not sent; it does not lose it. That is
harmless for plain SGD (linear in the gradient) but not for the optimizers people use:

- **momentum SGD**: a residual released late misses the momentum it would have had. DGC's
  *momentum correction* moves the momentum into the hook (``u = m u + g`` per entry, the
  residual accumulates ``u``, sent entries of ``u`` are zeroed: *factor masking*) and the
  optimizer runs with momentum 0 (:attr:`GaussKConfig.momentum_correction
  <lightning_gaussk.config.GaussKConfig>`);
- **Adam / AdamW**: a coordinate starved for many steps and then given its accumulated residual
  gets an outsized normalised update, and its second moment sees zeros most of the time.
  ``adam_remedy="freeze"`` freezes the second moment after ``variance_freeze_steps`` steps
  (1-bit Adam): the update is then linear in the gradient and error feedback only delays it.
  ``adam_remedy="amsgrad"`` uses AMSGrad's running maximum of the second moment instead
  (Comp-AMS).

:func:`wrap_optimizer` applies the remedy that fits one optimizer, in place, and returns it. The
Lightning strategy calls it for every optimizer at setup (``remedies="auto"``);
:func:`~lightning_gaussk.frontends.accelerate.register_gaussk` for every prepared optimizer; raw DDP users
call it themselves after creating the hook state::

    state = GaussKState(density=0.01).bind(ddp)
    ddp.register_comm_hook(state, gaussk_hook)
    optimizer = wrap_optimizer(torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9), state)

The optimizer keeps its class, its ``state_dict`` format and its user-visible hyper-parameters
except the momentum that moved into the hook (SGD: ``momentum`` becomes 0). Nothing else is
stored: the frozen second moment is Adam's own ``exp_avg_sq`` at step ``variance_freeze_steps``
(it is no longer updated), so an optimizer ``state_dict`` and the hook's ``state_dict`` (which
holds the velocity) resume exactly.
"""

from __future__ import annotations

import math
import types
from typing import Any

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_info, rank_zero_warn

__all__ = ["ADAPTIVE_HINTS", "describe", "frozen_adam_step", "wrap_optimizer"]

# names of optimizer classes that normalise the gradient per coordinate (warned about at low density)
ADAPTIVE_HINTS = ("adam", "adagrad", "rmsprop", "adadelta", "adafactor", "lamb", "lion", "nadam", "radam", "sophia", "shampoo")
_ATTR = "_gaussk_remedy"  # set on an adapted optimizer: what was done (idempotence, logs, tests)
# Measured: the LSTM language model of benchmarks/convergence.py with AdamW and no remedy, final
# validation loss above dense at equal steps, % by density (benchmarks/out/convergence-long.json;
# written by `python docs/gen_figures.py`, checked against the JSON by tests/test_docs.py)
# gen:adaptive_measured:begin
ADAPTIVE_MEASURED: dict[float, float] = {0.01: 2.4, 0.001: 21.0}
ADAPTIVE_MEASURED_STEPS = 1600
# gen:adaptive_measured:end
SAFE_GAP_PCT = 5.0  # a density whose measured gap is at most this is "safe" for an adaptive optimizer
# below this density an adaptive optimizer (Adam/AdamW, or one this library does not adapt) is warned about
RISKY_DENSITY = min(d for d, gap in ADAPTIVE_MEASURED.items() if gap <= SAFE_GAP_PCT)


def describe(optimizer: Any) -> str:
    """What :func:`wrap_optimizer` did to ``optimizer`` ("none" if it was not adapted)."""
    return getattr(_inner(optimizer), _ATTR, "none")


def wrap_optimizer(optimizer: Any, state: Any, *, log: bool = True) -> Any:
    """Adapt ``optimizer`` to the hook state ``state`` (a :class:`~lightning_gaussk.GaussKState`)
    by ``state.config.remedies`` and return it (the same object, changed in place).

    - ``torch.optim.SGD`` with ``momentum = m > 0``, only under ``remedies="all"`` (the same in every parameter group, no
      Nesterov, no dampening): the hook gets ``momentum_correction = m`` and the optimizer
      ``momentum = 0``. Loading an optimizer ``state_dict`` saved with momentum keeps it at 0.
    - ``torch.optim.Adam`` / ``AdamW``: ``adam_remedy`` (``"freeze"``: second moment frozen from
      step ``variance_freeze_steps``, and with neither it nor a warm-up given, the hook gets a
      density warm-up from 1.0 over those 100 steps, so the frozen moment is learnt from dense
      gradients; ``"amsgrad"``: ``amsgrad=True``; ``"none"``).
    - anything else: unchanged.

    An adaptive optimizer (Adam/AdamW or another that normalises per coordinate) at a density
    below :data:`RISKY_DENSITY` (the lowest measured density within :data:`SAFE_GAP_PCT` % of dense,
    :data:`ADAPTIVE_MEASURED`) gets a warning that quotes the measured gaps, whatever the remedy.

    ``remedies="none"`` changes nothing. A second call on the same optimizer changes nothing.
    Raises ``ValueError`` where a remedy cannot apply cleanly (groups with different momenta,
    Nesterov or dampening under ``remedies="auto"``, or momentum both in the hook and in the
    optimizer).
    """
    opt = _inner(optimizer)
    cfg = state.config
    if getattr(opt, _ATTR, None) is not None:
        return optimizer
    name = type(opt).__name__
    momenta = {float(g.get("momentum", 0.0) or 0.0) for g in opt.param_groups}
    if cfg.momentum_correction is not None and any(m > 0 for m in momenta):
        raise ValueError(
            f"GaussK: momentum_correction = {cfg.momentum_correction} moves momentum into the hook, but {name} still has "
            f"momentum {sorted(momenta)}: it would be applied twice. Set the optimizer's momentum to 0, or leave "
            "momentum_correction None with remedies='auto' (the strategy then moves it for you)."
        )
    if _is_adaptive(opt) and _min_density(cfg) < RISKY_DENSITY:
        rank_zero_warn(_adaptive_warning(name, cfg, adapted=type(opt) in (torch.optim.Adam, torch.optim.AdamW)))
    if cfg.remedies == "none":
        _mark(opt, "off")
        return optimizer
    what = "none"
    if type(opt) is torch.optim.SGD and any(m > 0 for m in momenta):
        if cfg.remedies == "all":
            what = _adapt_sgd(opt, state, momenta)
        else:  # measured: momentum correction lost to plain error feedback at density 0.01 (docs/convergence.md)
            what = "none (SGD momentum stays in the optimizer; remedies='all' moves it into the hook)"
    elif type(opt) in (torch.optim.Adam, torch.optim.AdamW):
        what = _adapt_adam(opt, state)
    elif type(opt) is not torch.optim.SGD and any(m > 0 for m in momenta):
        rank_zero_warn(
            f"GaussK: {name} has momentum {sorted(momenta)} but is not torch.optim.SGD: its momentum is applied to the "
            "sparse averaged gradient, without momentum correction (set momentum_correction and the optimizer's momentum "
            "to 0 to get it)."
        )
    _mark(opt, what)
    if log:
        rank_zero_info(f"GaussK remedies: {name} -> {what}")
    return optimizer


# ------------------------------------------------------------------------------------ SGD
def _adapt_sgd(opt: torch.optim.SGD, state: Any, momenta: set[float]) -> str:
    if len(momenta) != 1:
        raise ValueError(
            f"GaussK: SGD parameter groups have different momenta {sorted(momenta)}; momentum correction keeps one factor "
            "per hook. Use one momentum for all groups, or remedies='none'."
        )
    (m,) = momenta
    for g in opt.param_groups:
        if g.get("nesterov") or float(g.get("dampening", 0.0) or 0.0) != 0.0:
            raise ValueError(
                f"GaussK: SGD with nesterov={g.get('nesterov')} / dampening={g.get('dampening')}: momentum correction "
                "implements heavy-ball momentum only. Use nesterov=False, dampening=0, or remedies='none'."
            )
    state.config = state.config.replace(momentum_correction=m)
    _zero_momentum(opt)

    def keep_zero(optimizer: Any) -> None:  # a state_dict saved before the adaptation brings momentum back
        _zero_momentum(optimizer)

    opt.register_load_state_dict_post_hook(keep_zero)
    return f"momentum correction in the hook (m={m}), optimizer momentum 0"


def _zero_momentum(opt: torch.optim.Optimizer) -> None:
    for g in opt.param_groups:
        g["momentum"] = 0.0
    for st in opt.state.values():
        st.pop("momentum_buffer", None)


# ------------------------------------------------------------------------------------ Adam
def _adapt_adam(opt: torch.optim.Optimizer, state: Any) -> str:
    cfg = state.config
    if cfg.adam_remedy == "none":
        return "none (adam_remedy='none')"
    if any(g.get("fused") or g.get("capturable") or g.get("differentiable") for g in opt.param_groups):
        rank_zero_warn(f"GaussK: {type(opt).__name__} with fused/capturable/differentiable is not adapted (adam_remedy ignored)")
        return "none (fused/capturable)"
    if cfg.adam_remedy == "amsgrad":
        _set_amsgrad(opt)
        opt.register_load_state_dict_post_hook(_set_amsgrad)
        return "AMSGrad (max of the second moment)"
    freeze = cfg.freeze_step()
    warm = ""
    if cfg.variance_freeze_steps is None and cfg.warmup_steps == 0:
        # measured: a second moment frozen after sparse steps diverges (coordinates that were never
        # sent have v ~ 0); it must be learnt from (nearly) dense gradients: a warm-up from density 1
        state.config = cfg.replace(warmup_steps=freeze, warmup_density=1.0)
        warm = f", after a density warm-up from 1.0 over {freeze} steps"
    original = opt.step

    def step(self: Any, closure: Any = None) -> Any:
        if not _reached(self, freeze):
            return original(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        frozen_adam_step(self, freeze)
        return loss

    opt.step = types.MethodType(step, opt)  # type: ignore[method-assign]
    return f"second moment frozen from step {freeze} (1-bit Adam style){warm}"


def _set_amsgrad(opt: Any) -> None:
    for g in opt.param_groups:
        g["amsgrad"] = True
    for st in opt.state.values():
        if "exp_avg_sq" in st and "max_exp_avg_sq" not in st:
            st["max_exp_avg_sq"] = st["exp_avg_sq"].clone()


def _reached(opt: torch.optim.Optimizer, freeze: int) -> bool:
    """Whether some parameter has taken ``freeze`` steps (then the frozen update runs)."""
    for st in opt.state.values():
        if "step" in st and int(st["step"]) >= freeze:
            return True
    return False


@torch.no_grad()
def frozen_adam_step(opt: torch.optim.Optimizer, freeze: int) -> None:
    """One Adam/AdamW step whose second moment stays as it was at step ``freeze``.

    Per parameter with a gradient: ``t += 1``; weight decay (AdamW: ``p *= 1 - lr wd``; Adam:
    ``g += wd p``); ``m = lerp(m, g, 1 - beta1)``; ``p -= lr / (1 - beta1^t) * m /
    (sqrt(v / (1 - beta2^T)) + eps)`` with ``v = exp_avg_sq`` (AMSGrad: ``max_exp_avg_sq``) and
    ``T = freeze``, neither changed. A parameter that has taken fewer than ``freeze`` steps (it
    had no gradient earlier) still updates ``v`` as Adam does, until it reaches ``freeze``.
    """
    decoupled = isinstance(opt, torch.optim.AdamW)
    for group in opt.param_groups:
        beta1, beta2 = group["betas"]
        lr, eps, wd = float(group["lr"]), group["eps"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g = -p.grad if group.get("maximize") else p.grad
            st = opt.state[p]
            if not st:
                st["step"] = torch.tensor(0.0)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group.get("amsgrad"):
                    st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            done = int(st["step"])
            st["step"] += 1
            t = done + 1
            if wd != 0:
                if decoupled:
                    p.mul_(1 - lr * wd)
                else:
                    g = g.add(p, alpha=wd)
            st["exp_avg"].lerp_(g, 1 - beta1)
            v = st["max_exp_avg_sq"] if group.get("amsgrad") else st["exp_avg_sq"]
            if done < freeze:  # not frozen yet for this parameter: Adam's own update of v
                st["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                if group.get("amsgrad"):
                    torch.maximum(st["max_exp_avg_sq"], st["exp_avg_sq"], out=st["max_exp_avg_sq"])
                bc2 = 1 - beta2**t
            else:
                bc2 = 1 - beta2**freeze
            denom = (v.sqrt() / math.sqrt(bc2)).add_(eps)
            p.addcdiv_(st["exp_avg"], denom, value=-lr / (1 - beta1**t))


# ------------------------------------------------------------------------------------ helpers
def _adaptive_warning(name: str, cfg: Any, adapted: bool) -> str:
    measured = ", ".join(f"+{gap:.1f}% at density {d:g}" for d, gap in sorted(ADAPTIVE_MEASURED.items(), reverse=True))
    remedy = (
        f"adam_remedy={cfg.adam_remedy!r}; the remedies ('freeze', 'amsgrad') did not close the gap over that horizon"
        if adapted
        else "this library does not adapt it (adam_remedy applies to torch.optim.Adam/AdamW only)"
    )
    return (
        f"GaussK: {name} is an adaptive optimizer (it normalises the gradient per coordinate), at density {cfg.density:g} < {RISKY_DENSITY:g}: "
        "error feedback hands it delayed, accumulated gradients. Measured with AdamW, no remedy, "
        f"{ADAPTIVE_MEASURED_STEPS} steps (LSTM LM, docs/convergence.md): final validation loss {measured} "
        f"above dense at equal steps. {remedy[0].upper() + remedy[1:]}. Consider density >= {RISKY_DENSITY:g} "
        "or a longer run."
    )


def _inner(optimizer: Any) -> Any:
    """The torch optimizer inside Lightning's / Accelerate's wrappers."""
    for attr in ("_optimizer", "optimizer"):
        inner = getattr(optimizer, attr, None)
        if isinstance(inner, torch.optim.Optimizer):
            return inner
    return optimizer


def _mark(opt: Any, what: str) -> None:
    setattr(opt, _ATTR, what)


def _is_adaptive(opt: Any) -> bool:
    name = type(opt).__name__.lower()
    return any(h in name for h in ADAPTIVE_HINTS) or "betas" in getattr(opt, "defaults", {})


def _min_density(cfg: Any) -> float:
    return cfg.density
