"""LightningCLI: the example's yaml (class_path strategy with init_args) fits on 2 CPU processes,
``--print_config`` shows the strategy's own arguments, and ``strategy: gaussk_ddp`` works as a
plain string in a config file of a script that imports lightning_gaussk."""

import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("jsonargparse")
pytest.importorskip("sklearn")

from lightning.pytorch.cli import LightningCLI  # noqa: E402

from lightning_gaussk import GaussKDDPStrategy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "cli" / "train.py"
CONFIG = ROOT / "examples" / "cli" / "config.yaml"
NUMEL = 320 + 18496 + 131200 + 1290  # the example's CNN
OWN_ARGS = ["density", "selector", "error_feedback", "warmup_steps", "warmup_density", "seed",
            "find_unused_parameters", "static_graph", "gradient_as_bucket_view", "bucket_cap_mb"]  # fmt: skip
TORCH_INTERNALS = ["module", "device_ids", "output_device", "process_group", "init_sync", "device_mesh",
                   "broadcast_buffers", "bucket_cap_mb_list", "check_reduction", "mixed_precision"]  # fmt: skip


def run_cli(cwd: Path, *args: str) -> str:
    """``python examples/cli/train.py fit --config examples/cli/config.yaml ARGS`` (absolute paths, run in
    ``cwd``: the config's ``default_root_dir`` is relative)."""
    cmd = [sys.executable, str(SCRIPT), "fit", "--config", str(CONFIG), *args]
    if 0 < torch.cuda.device_count() < 2:  # accelerator: auto would pick 1 GPU for devices: 2
        cmd += ["--trainer.accelerator", "cpu"]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return proc.stdout


def test_example_yaml_fits_on_two_processes_with_the_class_path_strategy(tmp_path):
    out = run_cli(tmp_path)
    assert re.search(r"strategy GaussKDDPStrategy on 2 processes; 72 optimizer steps; val_acc (\d\.\d+)", out), out
    assert float(re.search(r"val_acc (\d\.\d+)", out).group(1)) > 0.5
    assert "GaussK density 0.01, selector 'gaussk'" in out  # init_args reached the strategy
    nnz = int(re.search(r"optimizer: (\d+) of (\d+)", out).group(1))
    assert 0 < nnz <= 2 * math.ceil(0.01 * NUMEL) < NUMEL // 10  # the hook ran on CPU and sparsified
    assert "GradientDistributionMonitor (3 analyses" in out  # the yaml's callback ran (every 24 steps)
    assert (tmp_path / "runs" / "cli_digits" / "config.yaml").exists()  # LightningCLI saved the config there


def test_print_config_shows_the_strategys_own_arguments(tmp_path):
    cfg = yaml.safe_load(run_cli(tmp_path, "--print_config"))
    strategy = cfg["trainer"]["strategy"]
    assert strategy["class_path"] == "lightning_gaussk.GaussKDDPStrategy"
    init = strategy["init_args"]
    assert [a for a in OWN_ARGS if a not in init] == []
    assert init["density"] == 0.01 and init["selector"] == "gaussk" and init["error_feedback"] is True
    assert [a for a in TORCH_INTERNALS if a in init] == []  # torch's DDP signature is not followed
    callbacks = [c["class_path"] for c in cfg["trainer"]["callbacks"]]
    assert callbacks == ["lightning_gaussk.GradientDistributionMonitor"]


def _example_module():
    spec = importlib.util.spec_from_file_location("gaussk_cli_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # imports lightning_gaussk: the names are registered
    return module


@pytest.mark.parametrize(("name", "selector"), [("gaussk_ddp", "gaussk"), ("topk_ddp", "topk")])
def test_plain_string_strategy_in_a_config_file(tmp_path, monkeypatch, name, selector):
    monkeypatch.setattr(sys, "argv", [str(SCRIPT)])  # not pytest's arguments
    example = _example_module()
    config = tmp_path / "by_name.yaml"
    config.write_text(f"seed_everything: 0\ntrainer:\n  strategy: {name}\n  accelerator: cpu\n  devices: 2\n  logger: false\n")
    cli = LightningCLI(example.DigitsClassifier, example.DigitsData, run=False, args=["--config", str(config)])
    assert isinstance(cli.trainer.strategy, GaussKDDPStrategy)
    assert cli.trainer.strategy.gaussk_config.selector == selector


def _help(monkeypatch, capsys) -> str:
    monkeypatch.setattr(sys, "argv", [str(SCRIPT)])  # not pytest's arguments
    example = _example_module()
    with pytest.raises(SystemExit):
        LightningCLI(example.DigitsClassifier, example.DigitsData,
                     args=["fit", "--trainer.strategy.help", "lightning_gaussk.GaussKDDPStrategy"])  # fmt: skip
    return capsys.readouterr().out


def test_cli_help_lists_the_strategy_arguments_with_types(capsys, monkeypatch):
    # python examples/cli/train.py fit --trainer.strategy.help lightning_gaussk.GaussKDDPStrategy
    text = _help(monkeypatch, capsys)
    for arg in OWN_ARGS:
        assert f"--trainer.strategy.{arg}" in text
    assert "(type: float, default: 0.001)" in " ".join(text.split())  # density (help text wraps lines)
    assert [a for a in TORCH_INTERNALS if f"--trainer.strategy.{a} " in text] == []


def test_cli_help_documents_the_strategy_arguments_and_offers_no_second_hook(capsys, monkeypatch):
    help_text = _help(monkeypatch, capsys)
    assert "fraction of each gradient bucket" in " ".join(help_text.split())  # the docstring reaches --help
    assert "ddp_comm_hook" not in help_text  # a second comm hook is not offered
