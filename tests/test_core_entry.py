"""The core entry without DDP, and the exchange protocol: ``reduce(state, key, params, grad)``
driven by hand on 2 gloo processes, through a test-only exchange that is one class and one
registration, and that delivers only half of each selection: the undelivered half stays in the
residual, so sent + residual == u still holds bit for bit."""

import pytest
import torch

from _dist import run_distributed
from _invariants import decode_mean
from lightning_gaussk import GaussKConfig, GaussKState
from lightning_gaussk.comm import codec
from lightning_gaussk.comm.exchange import Delivery, Exchange, Launched, Route, Selection, all_gather, buffer
from lightning_gaussk.comm.registry import available_exchanges, register_exchange
from lightning_gaussk.engine.pipeline import reduce
from test_hook import _gather


class FirstHalf(Exchange):
    """Test-only: all-gathers the first ``ceil(k / 2)`` entries of each selection and reports the
    rest undelivered."""

    name = "test-first-half"

    def launch(self, u: torch.Tensor, sel: Selection | None, out: torch.Tensor, route: Route, cache: dict) -> Launched:
        assert sel is not None
        h = (sel.k + 1) // 2
        msg = codec.pack(buffer(cache, "msg", codec.message_words(h), out.device), sel.values[:h], sel.indices[:h], sel.flag)
        gathered = buffer(cache, "gathered", route.peers * codec.message_words(h), out.device)
        work = all_gather(gathered, msg, group=route.group, async_op=True)

        def finish() -> Delivery:
            values, indices, flags = codec.unpack(gathered, h)
            out.index_add_(0, indices, values, alpha=1.0 / route.divisor)
            delivered = torch.arange(sel.k, device=out.device) < h
            return Delivery(flags.sum(), delivered)

        return Launched(work, finish)

    def message_bytes(self, k: int, d: int, peers: int) -> int:
        return 4 * codec.message_words((k + 1) // 2)

    def wire_bytes(self, k: int, d: int, peers: int) -> int:
        return self.message_bytes(k, d, peers) * (peers - 1)


register_exchange("test-first-half", FirstHalf)  # the one registration: now a valid `exchange` everywhere


def test_a_registered_exchange_is_a_valid_option_and_an_unknown_one_is_refused_by_name():
    assert "test-first-half" in available_exchanges()
    assert GaussKConfig(exchange="test-first-half").exchange == "test-first-half"
    with pytest.raises(ValueError, match=r"`exchange` must be one of \[.*'allgather'.*'allreduce'.*\], got 'ring'"):
        GaussKConfig(exchange="ring")


def _by_hand(rank: int, world: int) -> None:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(30)), torch.nn.Parameter(torch.randn(7, 5))]
    state = GaussKState(density=0.2, selector="topk", exchange="test-first-half", dense_fallback="never")
    state.store.names = {id(p): f"p{i}" for i, p in enumerate(params)}
    residual = torch.zeros(65)
    for step in range(3):
        grad = torch.randn(65, generator=torch.Generator().manual_seed(10 * step + rank))
        u = grad + residual
        k = 13
        idx = torch.topk(u.abs(), k).indices
        state.capture_next_step()
        out = reduce(state, 0, params, grad.clone()).wait()  # no DDP: a key, the parameters, a flat gradient
        state.end_backward()
        assert torch.equal(state.captured[0]["u"], u)
        got_idx = state.captured[0]["indices"].long()
        assert torch.equal(got_idx.sort().values, idx.sort().values)
        half = got_idx[: (k + 1) // 2]  # delivered: the first half of the selection, in its order
        residual = torch.cat(list(state.residuals().values()))
        expect = u.clone()
        expect[half] = 0.0
        assert torch.equal(residual, expect)  # the undelivered half stays in the residual: sent + residual == u
        assert int((residual != u).sum()) == int((u[half] != 0).sum()) < k
        every = _gather((u, half))
        assert torch.equal(out, decode_mean(every, 65, world))  # the update: the mean of what was delivered
    assert state.telemetry["hook_calls"] == 3 and state.telemetry["bytes_wire"] == 3 * 4 * 15 * (world - 1)


def test_the_core_entry_runs_without_ddp_and_a_partial_exchange_keeps_error_feedback_exact():
    run_distributed(_by_hand)
