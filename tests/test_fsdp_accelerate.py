"""FSDP2 under Accelerate. Accelerate's own FSDP2 cannot leave the replica reduction to a hook
(it shards over the whole world, or natively 2-D), so ``register_gaussk`` refuses it with the
recipe; the recipe itself (shard per node by hand, ``register_gaussk(accelerator, model,
mesh=mesh)``) runs here with torchrun on 4 CPU processes as 2 x 2 (tests/scripts/accelerate_fsdp.py):
it trains, counts one reduction per optimizer step under accumulation, and ``save_state`` /
``load_state`` carry every rank's residual shard."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("accelerate")
pytest.importorskip("torch.distributed.fsdp")

from accelerate import Accelerator  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402

from lightning_gaussk.frontends.accelerate import FSDP_RECIPE, find_ddp_module, register_gaussk  # noqa: E402

SCRIPT = Path(__file__).parent / "scripts" / "accelerate_fsdp.py"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("accelerate_fsdp")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GAUSSK_")}
    env.update(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4", str(SCRIPT), "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=out)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(4)]


def test_recipe_trains_and_every_rank_holds_the_same_parameters(ranks):
    for rank, rec in enumerate(ranks):
        assert rec["layout"] == {"world_size": 4, "rank": rank, "ranks_per_node": 2}
        head, tail = sum(rec["losses"][:4]) / 4, sum(rec["losses"][-4:]) / 4
        assert tail < 0.85 * head, rec["losses"]
        assert rec["bytes_inter"] > 0
        for n, p in rec["params"].items():
            assert torch.equal(p, ranks[0]["params"][n]), n


def test_accumulation_reduces_once_per_optimizer_step(ranks):
    assert all(rec["calls_after_12"] == 2 * 12 for rec in ranks)  # 2 units x 12 steps of 2 micro-batches


def test_save_state_and_load_state_carry_every_ranks_residual_shard(ranks):
    files = [f"gaussk_manifest_rank{r}.json" for r in range(4)] + [f"gaussk_state_rank{r}.pt" for r in range(4)]
    for rec in ranks:
        assert rec["files"] == sorted(files)
        assert rec["moved"] and rec["restored_equal"]


def test_accelerates_own_fsdp_is_refused_with_the_recipe(monkeypatch):
    accelerator = Accelerator(cpu=True)
    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType.FSDP))
    with pytest.raises(ValueError) as err:
        register_gaussk(accelerator, nn.Linear(2, 2))
    assert str(err.value) == FSDP_RECIPE
    assert "mesh=mesh" in FSDP_RECIPE and "docs/fsdp.md#accelerate" in FSDP_RECIPE


def test_an_fsdp2_model_without_its_mesh_is_refused_with_the_recipe():
    FSDPModule = type("FSDPModule", (nn.Module,), {})  # matched by class name, as fully_shard's is

    class Sharded(nn.Linear, FSDPModule):  # stands in for a fully_shard-ed module
        pass

    with pytest.raises(ValueError, match="register_gaussk\\(accelerator, model, mesh=mesh"):
        find_ddp_module(Sharded(2, 2))
