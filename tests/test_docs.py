"""The docs cannot rot: the API reference is generated from the code and must be current, and
every public name is documented."""

import importlib
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs"))

import gen_api  # noqa: E402


def test_api_reference_is_current():
    # regenerate with: python docs/gen_api.py
    assert (ROOT / "docs" / "api.md").read_text() == gen_api.render()


def test_every_public_name_is_in_the_api_reference_with_a_docstring():
    text = (ROOT / "docs" / "api.md").read_text()
    assert "(undocumented)" not in text
    for modname in gen_api.MODULES:
        for name in getattr(importlib.import_module(modname), "__all__", []):
            assert f"`{name}`" in text, (modname, name)


def test_readme_and_docs_link_to_pages_that_exist():
    import re

    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+\.(?:md|png))\)", page.read_text()):
            assert (page.parent / target).exists(), (page.name, target)


def test_readme_commands_are_the_ones_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmd = "bash scripts/setup.sh && .venv/bin/python -m pytest"
    assert test_cmd in readme and test_cmd in ci
    assert "bash scripts/setup.sh && .venv/bin/python examples/digits.py" in readme
    assert runpy.run_path(str(ROOT / "examples" / "digits.py"), run_name="not_main")["main"]


# the paths users import (README, docs): they stay whatever moves inside the layers (issue 25)
USER_PATHS = {
    "lightning_gaussk": ["GaussKConfig", "GaussKDDPStrategy", "GaussKFSDPStrategy", "GaussKLocalSGDStrategy", "GaussKState",
                         "GaussKTelemetry", "GradientDistributionMonitor", "SparseLocalSGD", "accumulate_select",
                         "available_selectors", "gaussk_hook", "get_selector", "register_selector", "select",
                         "telemetry_figures"],
    "lightning_gaussk.config": ["GaussKConfig"],
    "lightning_gaussk.accelerate": ["DISABLE_VAR", "ENV_VARS", "FSDP_RECIPE", "config_from_env", "find_ddp_module",
                                    "register_gaussk"],
    "lightning_gaussk.local_sgd": ["SparseLocalSGD", "local_grad_hook", "restore_local_sgd", "save_local_sgd"],
    "lightning_gaussk.transformers": ["register_gaussk"],
    "lightning_gaussk.fsdp": ["register_gaussk_fsdp"],
    "lightning_gaussk.preflight": ["main"],
}  # fmt: skip


def test_the_paths_users_import_stay():
    missing = [f"{mod}.{name}" for mod, names in USER_PATHS.items()
               for name in names if not hasattr(importlib.import_module(mod), name)]  # fmt: skip
    assert missing == []
    from lightning_gaussk.local_sgd import SparseLocalSGD

    assert {"global_params", "error_feedback", "state_dict", "load_state_dict"} <= set(dir(SparseLocalSGD))  # its read API
    from lightning.pytorch.strategies import StrategyRegistry

    names = {"gaussk_ddp", "gaussk_ddp_spawn", "topk_ddp", "topk_ddp_spawn", "gaussk_fsdp", "gaussk_local", "gaussk_local_spawn", "diloco"}
    assert names <= set(StrategyRegistry.available_strategies())
    from lightning_gaussk.engine.ddp_hook import validate_config
    from lightning_gaussk.frontends.accelerate import config_from_env, resolve_config

    assert resolve_config(environ={}, density=0.01)["density"] == 0.01
    assert config_from_env({"GAUSSK_DENSITY": "0.5"}) == {"density": 0.5}
    validate_config(0.01, "gaussk", True, 0, None, 0)


# ------------------------------------------------------------------ generated figures (docs/gen_figures.py)
import gen_figures  # noqa: E402


def test_generated_figures_are_current():
    # regenerate with: python docs/gen_figures.py (tables from benchmarks/out/*.json and the cost model)
    assert gen_figures.stale() == []


def test_every_block_that_can_be_regenerated_here_is_checked():
    checked = {f"{b.path} {b.name}" for b in gen_figures.BLOCKS if gen_figures.available(b)}
    assert {"docs/convergence.md convergence", "docs/convergence.md convergence_long", "docs/convergence.md convergence_summary",
            "lightning_gaussk/frontends/remedies.py adaptive_measured", "docs/benchmarks.md break_even", "docs/benchmarks.md scaleout",
            "docs/benchmarks.md exchange", "docs/benchmarks.md scaleout_seeds"} <= checked  # fmt: skip


def _copy(tmp_path, paths):
    import shutil

    for p in paths:
        (tmp_path / p).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / p, tmp_path / p)


def test_a_hand_edited_figure_fails_the_check(tmp_path):
    paths = sorted({b.path for b in gen_figures.BLOCKS})
    _copy(tmp_path, paths)
    assert gen_figures.stale(tmp_path) == []
    conv = tmp_path / "docs" / "convergence.md"
    conv.write_text(conv.read_text().replace("| +2.4% (3 seeds) |", "| +1.4% (3 seeds) |", 1))
    bench = tmp_path / "docs" / "benchmarks.md"
    text = bench.read_text()
    row = next(ln for ln in text.splitlines() if ln.startswith("| 64 x 8 | 200.6 / "))
    bench.write_text(text.replace(row, row.replace("200.6", "210.6", 1), 1))
    rem = tmp_path / "lightning_gaussk" / "frontends" / "remedies.py"
    rem.write_text(rem.read_text().replace("0.001: 21.0}", "0.001: 12.0}", 1))
    assert gen_figures.stale(tmp_path) == [
        "docs/convergence.md convergence_summary", "lightning_gaussk/frontends/remedies.py adaptive_measured", "docs/benchmarks.md scaleout",
    ]  # fmt: skip


def test_the_adaptive_warning_quotes_the_measured_figures():
    from lightning_gaussk.frontends import remedies

    gaps = {rho: g for (fam, rho, steps), (g, _) in gen_figures.headline_gaps().items() if fam == "lm-adamw" and steps == 1600}
    assert remedies.ADAPTIVE_MEASURED == {rho: round(g, 1) for rho, g in gaps.items()}
    assert remedies.RISKY_DENSITY == 0.01
