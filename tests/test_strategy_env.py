"""GAUSSK_* variables in a Lightning job: honoured, or warned about, never silently ignored.

Precedence (docs/configuration.md): keyword argument > GAUSSK_* variable > default, as
``register_gaussk`` (``resolve_config``). A keyword counts as given when it differs from the
strategy's default (LightningCLI passes every argument it has)."""

import warnings

import lightning as L
import pytest
from lightning.pytorch.strategies import StrategyRegistry

import lightning_gaussk  # noqa: F401  (registers "gaussk_ddp")
from lightning_gaussk import GaussKDDPStrategy
from lightning_gaussk.frontends.accelerate import resolve_config


@pytest.fixture(autouse=True)
def _no_gaussk_env(monkeypatch):
    import os

    for var in [v for v in os.environ if v.startswith("GAUSSK_")]:
        monkeypatch.delenv(var)


def test_gaussk_density_is_honoured_by_the_strategy(monkeypatch):
    monkeypatch.setenv("GAUSSK_DENSITY", "0.02")
    monkeypatch.setenv("GAUSSK_HIERARCHY", "flat")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # used, so no warning
        cfg = GaussKDDPStrategy().gaussk_config
    assert cfg.density == 0.02 and cfg.hierarchy == "flat"
    assert cfg.to_dict() == resolve_config(environ={"GAUSSK_DENSITY": "0.02", "GAUSSK_HIERARCHY": "flat"})


def test_gaussk_density_is_honoured_through_the_registered_name_and_a_trainer(monkeypatch):
    monkeypatch.setenv("GAUSSK_DENSITY", "0.05")
    assert StrategyRegistry.get("gaussk_ddp").gaussk_config.density == 0.05
    trainer = L.Trainer(strategy="gaussk_ddp", accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    assert trainer.strategy.gaussk_config.density == 0.05


def test_an_explicit_keyword_overrides_gaussk_density_with_a_warning(monkeypatch):
    monkeypatch.setenv("GAUSSK_DENSITY", "0.02")
    with pytest.warns(UserWarning, match=r"GAUSSK_DENSITY='0.02' is overridden by density=0.05"):
        cfg = GaussKDDPStrategy(density=0.05).gaussk_config
    assert cfg.density == 0.05


def test_a_keyword_equal_to_the_default_leaves_the_variable_in_force(monkeypatch):
    # what LightningCLI passes for an option the yaml does not set
    monkeypatch.setenv("GAUSSK_DENSITY", "0.02")
    assert GaussKDDPStrategy(density=0.001, selector="gaussk").gaussk_config.density == 0.02


def test_unknown_and_invalid_variables_are_reported(monkeypatch):
    monkeypatch.setenv("GAUSSK_DENSTY", "0.02")
    with pytest.warns(UserWarning, match="GAUSSK_DENSTY"):
        assert GaussKDDPStrategy().gaussk_config.density == 0.001
    monkeypatch.delenv("GAUSSK_DENSTY")
    monkeypatch.setenv("GAUSSK_DENSITY", "2")
    with pytest.raises(ValueError, match="GAUSSK_DENSITY='2'"):
        GaussKDDPStrategy()
    monkeypatch.setenv("GAUSSK_DENSITY", "lots")
    with pytest.raises(ValueError, match="GAUSSK_DENSITY"):
        GaussKDDPStrategy()


def test_without_variables_the_keywords_and_defaults_are_the_config():
    assert GaussKDDPStrategy().gaussk_config.density == 0.001
    assert GaussKDDPStrategy(density=0.01, exchange="allreduce").gaussk_config.exchange == "allreduce"


# ------------------------------------------------------------------------------- local SGD
def test_gaussk_sync_every_is_honoured_by_gaussk_local_and_diloco(monkeypatch):
    """The local SGD strategies read their options (``LocalSGDConfig``) the same way."""
    monkeypatch.setenv("GAUSSK_SYNC_EVERY", "8")
    monkeypatch.setenv("GAUSSK_QUANTIZE", "2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # used, so no warning
        cfg = StrategyRegistry.get("gaussk_local").local_config
    assert cfg.sync_every == 8 and cfg.quantize == 2
    monkeypatch.delenv("GAUSSK_QUANTIZE")
    diloco = StrategyRegistry.get("diloco").local_config  # the registered keywords are given: outer, outer_lr
    assert (diloco.sync_every, diloco.outer, diloco.outer_lr) == (8, "dense", 0.7)
    monkeypatch.setenv("GAUSSK_OUTER_LR", "0.5")
    with pytest.warns(UserWarning, match=r"GAUSSK_OUTER_LR='0.5' is overridden by outer_lr=0.7"):
        assert StrategyRegistry.get("diloco").local_config.outer_lr == 0.7


def test_local_sgd_variables_are_checked_and_the_per_step_ones_are_not_its_own(monkeypatch):
    from lightning_gaussk.frontends.lightning_local import GaussKLocalSGDStrategy

    monkeypatch.setenv("GAUSSK_SYNC_EVERY", "0")
    with pytest.raises(ValueError, match="GAUSSK_SYNC_EVERY='0'"):
        GaussKLocalSGDStrategy()
    monkeypatch.delenv("GAUSSK_SYNC_EVERY")
    monkeypatch.setenv("GAUSSK_WARMUP_STEPS", "10")  # GaussKConfig's, not local SGD's
    with pytest.warns(UserWarning, match="GAUSSK_WARMUP_STEPS"):
        GaussKLocalSGDStrategy()


def test_register_gaussk_local_path_reads_the_variables_and_validates_first(monkeypatch):
    from accelerate import Accelerator
    from torch import nn

    from lightning_gaussk.frontends.accelerate import register_gaussk

    monkeypatch.setenv("GAUSSK_OUTER_LR", "-1")
    with pytest.raises(ValueError, match="GAUSSK_OUTER_LR='-1'"):  # even on one process
        register_gaussk(Accelerator(cpu=True), nn.Linear(2, 2), sync_every=4)
