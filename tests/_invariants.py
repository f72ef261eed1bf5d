"""The invariants every sync of the hook must keep, written once for every test that checks them."""

import torch


def assert_residual_is_u_minus_sent(u: torch.Tensor, indices: torch.Tensor, residual: torch.Tensor) -> None:
    """Error feedback drops nothing and makes nothing up: the new residual is ``u`` with the
    sent entries zeroed, so ``sent + residual == u`` bit for bit (``sent = u`` at ``indices``)."""
    sent = torch.zeros_like(u).index_put_((indices,), u[indices])
    assert torch.equal(sent + residual, u)
    assert int(residual[indices].count_nonzero()) == 0


def decode_mean(messages: list[tuple[torch.Tensor, torch.Tensor]], size: int, world: int, device: str = "cpu") -> torch.Tensor:
    """What the hook decodes from ``[(u_r, indices_r), ...]``: ``sum_r scatter(indices_r, u_r[indices_r]) / world``,
    accumulated in the order given (duplicates add up)."""
    agg = torch.zeros(size, device=device)
    for u, idx in messages:
        agg.index_add_(0, idx.to(torch.int32), u[idx], alpha=1.0 / world)
    return agg
