"""GaussKConfig: each option declared once and reaching the hook the same way from keyword
arguments, LightningCLI yaml, ``GAUSSK_*`` variables and a checkpoint; the strategy's signature,
the fields and the variables agree."""

import dataclasses
import importlib.util
import io
import sys
from pathlib import Path

import pytest
import torch

from lightning_gaussk import GaussKDDPStrategy, GaussKState
from lightning_gaussk.frontends.accelerate import ENV_VARS, config_from_env, register_gaussk, resolve_config
from lightning_gaussk.config import GaussKConfig, bucket_k, config_fields, env_var

ROOT = Path(__file__).resolve().parents[1]

# a value other than the default for every option (a new option must be added here: the test
# below fails until it is)
CHANGED = {
    "density": 0.05,
    "selector": "topk",
    "error_feedback": False,
    "warmup_steps": 7,
    "warmup_density": 0.5,
    "seed": 11,
    "dense_fallback": "auto",
    "link_gbit": 2.5,
    "exchange": "allreduce",
    "hierarchy": "flat",
    "ranks_per_node": 2,
    "remedies": "none",
    "momentum_correction": 0.9,
    "momentum_masking": False,
    "adam_remedy": "amsgrad",
    "variance_freeze_steps": 50,
}
# the same, as environment variable text
AS_TEXT = {"error_feedback": "off"}
# dense_fallback's other value ("never") cannot go with link_gbit: checked on its own
NEVER = {"dense_fallback": "never", "link_gbit": None}


def _changed_configs() -> list[dict]:
    return [CHANGED, {**CHANGED, **NEVER}]


def test_every_option_has_a_changed_value_here_and_a_doc():
    assert list(CHANGED) == list(config_fields())
    for name, f in config_fields().items():
        assert CHANGED[name] != f.default or name == "dense_fallback", name
        assert f.metadata["doc"], name


def _strategies() -> dict[str, tuple[type, type, tuple[str, ...]]]:
    """Every strategy: its class, the options class it spells out, the options it leaves out."""
    from lightning_gaussk.config import LocalSGDConfig
    from lightning_gaussk.frontends.lightning_fsdp import LAYOUT_OPTIONS, GaussKFSDPStrategy
    from lightning_gaussk.frontends.lightning_local import GaussKLocalSGDStrategy

    return {
        "gaussk_ddp": (GaussKDDPStrategy, GaussKConfig, ()),
        "gaussk_fsdp": (GaussKFSDPStrategy, GaussKConfig, LAYOUT_OPTIONS),  # its layout is the mesh
        "gaussk_local": (GaussKLocalSGDStrategy, LocalSGDConfig, ()),
    }


@pytest.mark.parametrize("strategy", ["gaussk_ddp", "gaussk_fsdp", "gaussk_local"])
def test_strategy_signature_is_its_options_declaration(strategy):
    """The strategies spell the options out (LightningCLI reads the signature): names, order,
    defaults, types and docs must be the declaration's (one check: ``wiring.check_signature``)."""
    from lightning_gaussk.frontends.wiring import check_signature

    cls, config_cls, left_out = _strategies()[strategy]
    assert check_signature(cls.__init__, config_cls, left_out=left_out, doc=cls.__doc__) == []


def test_check_signature_names_what_differs():
    from lightning_gaussk.frontends.wiring import check_signature

    def init(self, density: float = 0.5, selector: int = 0):
        """density: fraction."""

    problems = check_signature(init, GaussKConfig, left_out=[n for n in config_fields() if n not in ("density", "selector")], doc="")
    assert any("density: default" in p for p in problems) and any("selector: type" in p for p in problems)
    assert any("its declared doc" in p for p in problems)
    assert check_signature(lambda self, selector="gaussk": None, GaussKConfig)[0].startswith("names or order")


def test_environment_variables_are_the_fields_and_documented():
    everything = config_fields()
    assert ENV_VARS == {name: "GAUSSK_" + name.upper() for name in everything} == {n: env_var(n) for n in everything}
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert [v for v in ENV_VARS.values() if v not in doc] == []  # every variable is documented


@pytest.mark.parametrize("values", _changed_configs(), ids=["auto", "never"])
def test_every_option_round_trips_through_keywords(values):
    assert GaussKConfig(**values).to_dict() == values
    assert GaussKState(**values).config.to_dict() == values
    assert GaussKState(GaussKConfig(**values)).config.to_dict() == values
    assert GaussKDDPStrategy(**values).gaussk_config.to_dict() == values
    assert {k: v for k, v in resolve_config(environ={}, **values).items()} == values  # register_gaussk's keywords
    state = GaussKState(**values)
    assert all(getattr(state, name) == value for name, value in values.items())  # readable as attributes


@pytest.mark.parametrize("values", _changed_configs(), ids=["auto", "never"])
def test_every_option_round_trips_through_gaussk_environment_variables(values):
    env = {env_var(n): AS_TEXT.get(n, "none" if v is None else str(v)) for n, v in values.items()}
    assert config_from_env(env) == values
    assert GaussKConfig.from_env(env).to_dict() == values
    assert resolve_config(environ=env) == values
    assert resolve_config(environ=env, seed=99)["seed"] == 99  # keywords win


@pytest.mark.parametrize("values", _changed_configs(), ids=["auto", "never"])
def test_every_option_round_trips_through_a_checkpoint(values):
    buf = io.BytesIO()
    torch.save(GaussKState(**values).state_dict(), buf)
    saved = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    assert GaussKConfig.from_dict(saved["config"]) == GaussKConfig(**values)


def test_every_option_round_trips_through_lightningcli_yaml(tmp_path, monkeypatch):
    pytest.importorskip("jsonargparse")
    from lightning.pytorch.cli import LightningCLI

    script = ROOT / "examples" / "cli" / "train.py"
    monkeypatch.setattr(sys, "argv", [str(script)])
    spec = importlib.util.spec_from_file_location("gaussk_cli_example_config", script)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    for i, values in enumerate(_changed_configs()):
        lines = "".join(f"      {n}: {'null' if v is None else str(v).lower() if isinstance(v, bool) else v}\n" for n, v in values.items())
        config = tmp_path / f"all_options_{i}.yaml"
        config.write_text(
            "trainer:\n  accelerator: cpu\n  devices: 2\n  logger: false\n  strategy:\n"
            f"    class_path: lightning_gaussk.GaussKDDPStrategy\n    init_args:\n{lines}"
        )
        cli = LightningCLI(example.DigitsClassifier, example.DigitsData, run=False, args=["--config", str(config)])
        assert cli.trainer.strategy.gaussk_config.to_dict() == values


def test_checkpoint_config_of_an_older_version_loads_with_defaults_and_unknown_keys_are_refused():
    old = {k: v for k, v in GaussKConfig(density=0.01).to_dict().items() if k not in ("hierarchy", "ranks_per_node")}
    assert GaussKConfig.from_dict(old) == GaussKConfig(density=0.01)
    with pytest.raises(ValueError, match="densty"):
        GaussKConfig.from_dict({"densty": 0.1})


@pytest.mark.parametrize(
    ("kwargs", "error", "fragments"),
    [
        ({"hierarchy": "tree"}, ValueError, ["`hierarchy`", "'tree'", "node"]),
        ({"ranks_per_node": 0}, ValueError, ["`ranks_per_node`", "0", ">= 1"]),
        ({"ranks_per_node": 2.0}, ValueError, ["`ranks_per_node`", "2.0", "int"]),
        ({"ranks_per_node": True}, ValueError, ["`ranks_per_node`", "True", "int"]),
        ({"dense_fallback": "never", "link_gbit": 10.0}, ValueError, ["`link_gbit`", "10.0", "'never'"]),
        ({"dense_fallback": "sometimes"}, ValueError, ["`dense_fallback`", "'sometimes'", "never"]),
    ],
)
def test_config_rejects_bad_options_naming_argument_and_value(kwargs, error, fragments):
    for build in (GaussKConfig, GaussKState, GaussKDDPStrategy):
        with pytest.raises(error) as err:
            build(**kwargs)
        assert all(f in str(err.value) for f in fragments), (build, str(err.value))


def test_config_is_frozen_and_replace_validates():
    cfg = GaussKConfig(density=0.01)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.density = 0.5  # type: ignore[misc]
    assert cfg.replace(seed=4).seed == 4 and cfg.seed == 0
    with pytest.raises(ValueError, match="density"):
        cfg.replace(density=0.0)
    with pytest.raises(TypeError, match="GaussKState\\(density=0.01\\)"):
        GaussKState(0.01)  # type: ignore[arg-type]


def test_register_gaussk_accepts_dense_fallback_and_link_gbit_from_keywords_and_environment(monkeypatch):
    assert resolve_config(environ={}, dense_fallback="never")["dense_fallback"] == "never"  # was a TypeError
    env = {"GAUSSK_DENSE_FALLBACK": "never"}
    assert resolve_config(environ=env)["dense_fallback"] == "never"
    assert resolve_config(environ={"GAUSSK_LINK_GBIT": "25"})["link_gbit"] == 25.0
    with pytest.raises(ValueError, match="GAUSSK_LINK_GBIT='fast'"):
        resolve_config(environ={"GAUSSK_LINK_GBIT": "fast"})
    with pytest.raises(ValueError, match="GAUSSK_DENSE_FALLBACK='sometimes'"):
        resolve_config(environ={"GAUSSK_DENSE_FALLBACK": "sometimes"})
    from accelerate import Accelerator

    monkeypatch.setenv("GAUSSK_DENSE_FALLBACK", "never")
    monkeypatch.setenv("GAUSSK_LINK_GBIT", "10")  # no effect under 'never': refused, naming both variables
    with pytest.raises(ValueError, match="GAUSSK_LINK_GBIT='10'"):
        register_gaussk(Accelerator(cpu=True), torch.nn.Linear(2, 2))


def test_bucket_k_is_the_one_formula_of_k():
    assert bucket_k(0.01, 300) == 3 and bucket_k(0.001, 10) == 1 and bucket_k(1.0, 7) == 7
    state = GaussKState(density=0.01)
    assert state.k_for(300) == bucket_k(0.01, 300)
