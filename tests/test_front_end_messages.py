"""What the front ends say and refuse before and while they start (issue 26, findings 2, 3, 7, 8).

- every registered strategy refuses an unknown keyword at construction, naming it and listing
  what is allowed; the pre-flight's recommendation passes straight into the strategy it names;
- local SGD logs its own startup line (H, the outer step, bytes per inner step against dense DDP),
  not the per-step hook's; ``diloco``'s says its outer step is dense;
- configurations that exchange nothing warn (local SGD on one rank, FSDP2 on one node), and the
  FSDP2 line counts the replicas without the rank itself;
- ``gaussk_local`` refuses a ``configure_model`` that shards with FSDP2.

Single-process where possible: strategies construct without launching, ``SparseLocalSGD`` runs
without a process group, and a Lightning fit on one device runs in this process. One spawned
2-process run (module fixture ``two_ranks``) gives the figures that need peers.
"""

from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager

import lightning as L
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import StrategyRegistry
from torch import nn

import lightning_gaussk  # noqa: F401 (registers the strategies)
from _dist import run_distributed
from lightning_gaussk.costs import model as costmodel
from lightning_gaussk.frontends.lightning_local import GaussKLocalSGDStrategy
from lightning_gaussk.local_sgd import SparseLocalSGD
from lightning_gaussk.observe import preflight

PER_STEP_LINE = "each rank selects ceil(density * d)"  # the per-step hook's startup line (engine/describe.py)


def _ours() -> list[str]:
    return sorted(n for n in StrategyRegistry if StrategyRegistry[n]["strategy"].__module__.startswith("lightning_gaussk"))


def _build(name: str, **kwargs):
    entry = StrategyRegistry[name]
    return entry["strategy"](**{**entry["init_params"], **kwargs})


# ------------------------------------------------------------------------------- unknown keywords
#: a misspelling of one of each engine's own options, and the option meant
TYPOS = {"GaussKDDPStrategy": ("densty", "density"), "GaussKFSDPStrategy": ("densty", "density"),
         "GaussKLocalSGDStrategy": ("sync_evry", "sync_every")}  # fmt: skip


#: the names the issue lists, and whatever else this package registers
NAMES = sorted({"gaussk_ddp", "gaussk_ddp_spawn", "topk_ddp", "gaussk_fsdp", "gaussk_local", "gaussk_local_spawn", "diloco", *_ours()})


@pytest.mark.parametrize("name", NAMES)
def test_every_registered_strategy_refuses_a_misspelled_keyword_at_construction_naming_it_and_what_is_allowed(name):
    cls = StrategyRegistry[name]["strategy"]
    typo, meant = TYPOS[cls.__name__]
    with pytest.raises(TypeError) as err:
        _build(name, **{typo: 8})
    msg = str(err.value)
    assert f"`{typo}`" in msg and f"did you mean `{meant}`?" in msg
    assert f"{cls.__name__}'s own arguments" in msg and "'density'" in msg and "'timeout'" in msg
    if cls.__name__ == "GaussKFSDPStrategy":
        assert "forwards no further keywords" in msg
    else:  # DDP-based: DDP's real arguments are allowed and listed
        assert "DistributedDataParallel's arguments" in msg and "'broadcast_buffers'" in msg
        assert _build(name, broadcast_buffers=False)._ddp_kwargs["broadcast_buffers"] is False


@pytest.mark.parametrize(
    "name, keyword, why",
    [
        ("gaussk_local", "link_gbit", "per-step engines"),
        ("diloco", "warmup_steps", "per-step engines"),
        ("gaussk_ddp", "sync_every", "local SGD"),
        ("gaussk_fsdp", "outer_lr", "local SGD"),
        ("gaussk_fsdp", "hierarchy", "the layout is the mesh"),
    ],
)
def test_an_option_of_another_engine_is_refused_at_construction_saying_whose_it_is(name, keyword, why):
    with pytest.raises(TypeError, match=f"`{keyword}` \\(.*{why}"):
        _build(name, **{keyword: 1})


def test_a_preflight_recommendation_passes_straight_into_the_strategy_it_names():
    buckets = [sum(g) for g in preflight.ddp_bucket_groups(preflight.params_numels(25_000_000))]
    slow = costmodel.Link.from_gbit(0.1)
    table = preflight.predict_table(buckets, 2, 2, costmodel.Link(5e-6, 100e9), slow, costmodel.HostCosts.for_device("cpu"))
    rec, _ = preflight.recommend(table, slow)
    assert rec is not None and "link_gbit" in rec
    strategy = _build(preflight.RECOMMENDED_STRATEGY, **rec)
    assert {k: getattr(strategy.gaussk_config, k) for k in rec} == rec  # every key taken, none lost
    # the per-step recommendation is not local SGD's: refused at construction, not after launch
    with pytest.raises(TypeError, match="`link_gbit` \\(an option of the per-step engines"):
        GaussKLocalSGDStrategy(**rec)


# ------------------------------------------------------------------------------- local SGD, one process
def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1))


def _local_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "lightning_gaussk" and "GaussK" in r.getMessage()]


def test_sparse_local_sgd_logs_its_own_line_with_h_and_the_sparse_outer_step_and_warns_one_rank_exchanges_nothing(caplog):
    model = _net()
    with caplog.at_level(logging.INFO, logger="lightning_gaussk"), pytest.warns(UserWarning, match="nothing is exchanged"):
        local = SparseLocalSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), sync_every=8, density=0.05, chunk=64,
                               quantize=2, outer_lr=2.0, ef_decay=0.9)  # fmt: skip
    (line,) = _local_lines(caplog)
    assert line.startswith("GaussK local SGD: flat, 1 ranks; H = sync_every = 8 optimizer steps")
    assert f"sparse (SparseLoCo): {local.k:,} of {local.d:,} entries per outer step (density 0.05, top-k per chunk of 64)" in line
    assert "2-bit values, one fp32 scale per chunk" in line and "exchange: allgather" in line
    assert "outer lr 2.0" in line and "ef_decay 0.9" in line and "one rank: nothing is exchanged" in line
    assert PER_STEP_LINE not in line


# ------------------------------------------------------------------------------- Lightning, one device, in this process
@contextmanager
def _in_process_fit():
    """A Lightning fit on one device in the pytest process: its environment variables and its
    process group of one do not outlive it."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = _net()

    def training_step(self, batch, batch_idx):
        return self.net(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class _ShardedTiny(_Tiny):
    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        fully_shard(self.net, mesh=self.device_mesh["shard"])  # FSDP2's usual configure_model


def _fit(strategy, module: L.LightningModule) -> None:
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader(torch.randn(16, 16), batch_size=4))


def test_diloco_logs_the_local_line_saying_its_outer_step_is_dense_not_the_per_step_line_and_one_device_warns(caplog):
    with _in_process_fit(), caplog.at_level(logging.INFO, logger="lightning_gaussk"), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _fit("diloco", _Tiny())
    lines = _local_lines(caplog)
    assert not [x for x in lines if PER_STEP_LINE in x]
    (line,) = [x for x in lines if x.startswith("GaussK local SGD:")]
    assert "H = sync_every = 16" in line
    assert "dense all-reduce of the pseudo-gradients" in line and "outer Nesterov lr 0.7, momentum 0.9" in line
    assert "SparseLoCo" not in line
    assert any("nothing is exchanged" in str(w.message) for w in seen)


def test_gaussk_local_refuses_an_fsdp2_configure_model_naming_the_combination_and_the_alternatives():
    with _in_process_fit(), pytest.raises(ValueError) as err:
        _fit("gaussk_local", _ShardedTiny())
    msg = str(err.value)
    assert "GaussKLocalSGDStrategy" in msg and "configure_model" in msg and "FSDP2 (fully_shard) is not supported" in msg
    assert "gaussk_fsdp" in msg and "without fully_shard" in msg


# ------------------------------------------------------------------------------- one spawned 2-process run
def _two_rank_worker(rank: int, world: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lightning_gaussk.engine.fsdp import MESH_DIMS, register_gaussk_fsdp

    torch.set_num_threads(1)
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    log = logging.getLogger("lightning_gaussk")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    rec: dict = {}

    def caught(fn):
        lines.clear()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            result = fn()
        return result, list(lines), [str(w.message) for w in seen]

    def local(**kw):
        model = _net()
        return SparseLocalSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), hierarchy="flat", **kw)

    sparse, rec["sparse_lines"], rec["sparse_warnings"] = caught(lambda: local(sync_every=8, density=0.05, chunk=64, quantize=2))
    rec["sparse"] = {"outer_bytes": sparse.outer_bytes, "dense": sparse.dense_bytes_per_step, "k": sparse.k, "d": sparse.d}
    _, rec["dense_lines"], _ = caught(lambda: local(outer="dense", outer_lr=0.7))
    alone = dist.new_group([0])  # every rank creates it; rank 0 runs local SGD in it alone
    if rank == 0:
        _, rec["alone_lines"], rec["alone_warnings"] = caught(lambda: local(process_group=alone))
    for shape in ((1, 2), (2, 1)):  # one node of 2 ranks; 2 nodes of 1 rank
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=MESH_DIMS)
        model = _net()
        fully_shard(model, mesh=mesh["shard"])
        _, rec[f"fsdp{shape}_lines"], rec[f"fsdp{shape}_warnings"] = caught(lambda: register_gaussk_fsdp(model, mesh, density=0.1))
    if rank == 0:
        torch.save(rec, out)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_ranks") / "rank0.pt"
    run_distributed(_two_rank_worker, str(out), world=2)
    return torch.load(out, weights_only=False)


def test_local_sgd_line_gives_expected_bytes_per_inner_step_against_dense_ddp(two_ranks):
    (line,) = two_ranks["sparse_lines"]
    s = two_ranks["sparse"]
    assert line.startswith("GaussK local SGD: flat, 2 ranks; H = sync_every = 8")
    assert f"{s['k']:,} of {s['d']:,} entries per outer step" in line and "2-bit values" in line
    assert s["dense"] == 4 * s["d"] and 0 < s["outer_bytes"] < s["dense"]
    assert f"expected {s['outer_bytes'] / 8:,.0f} bytes per inner step ({s['outer_bytes']:,} per outer step / 8)" in line
    assert f"against dense DDP's {s['dense']:,} per step ({s['dense'] * 8 / s['outer_bytes']:.1f}x fewer)" in line
    assert not [w for w in two_ranks["sparse_warnings"] if "nothing is exchanged" in w]


def test_diloco_line_on_two_ranks_says_dense_all_reduce_and_outer_nesterov(two_ranks):
    (line,) = two_ranks["dense_lines"]
    assert "dense all-reduce of the pseudo-gradients" in line and "outer Nesterov lr 0.7, momentum 0.9" in line
    assert "against dense DDP's" in line and PER_STEP_LINE not in line


def test_local_sgd_in_a_group_of_one_rank_warns_that_nothing_is_exchanged(two_ranks):
    assert any("nothing is exchanged" in w for w in two_ranks["alone_warnings"])
    assert "one rank: nothing is exchanged" in two_ranks["alone_lines"][0]


def test_fsdp2_on_one_node_warns_that_nothing_crosses_nodes_and_counts_no_replica(two_ranks):
    (line,) = two_ranks["fsdp(1, 2)_lines"]
    assert "1 nodes x 2 ranks" in line and "nothing is exchanged between nodes" in line and "replicas" not in line
    assert any("one node" in w and "sends nothing between nodes" in w for w in two_ranks["fsdp(1, 2)_warnings"])


def test_fsdp2_line_counts_the_replicas_without_the_rank_itself(two_ranks):
    (line,) = two_ranks["fsdp(2, 1)_lines"]
    assert "2 nodes x 1 ranks" in line and "exchanges them with its 1 replica on the other node;" in line
    assert not [w for w in two_ranks["fsdp(2, 1)_warnings"] if "one node" in w]



def test_gaussk_ddp_refuses_an_fsdp2_configure_model_pointing_to_gaussk_fsdp_instead_of_a_bare_type_error():
    with _in_process_fit(), pytest.raises(ValueError) as err:
        _fit("gaussk_ddp", _ShardedTiny())
    msg = str(err.value)
    assert "GaussKDDPStrategy runs on DDP" in msg and "FSDP2 (fully_shard) is not supported" in msg
    assert "strategy='gaussk_fsdp'" in msg and "without fully_shard" in msg
    assert isinstance(err.value.__cause__, TypeError)  # Lightning's bare "'NoneType' object is not subscriptable", chained
