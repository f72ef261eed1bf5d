"""The refactor guard: flat (2 ranks) and node mode (2 x 2) reproduce the recorded golden runs bit
for bit (parameters, residuals, velocities) for gaussk, topk and randk, momentum correction, a
changing loss scale and a density warm-up (``tests/golden/cases.py``)."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "golden"))
import cases  # noqa: E402


def _assert_same(got: dict, want: dict, where: str) -> None:
    assert got.keys() == want.keys(), where
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), f"{where}: {name} differs (max {float((got[name] - tensor).abs().max())})"


@pytest.mark.parametrize("mode", sorted(cases.MODES))
def test_training_equals_the_golden_files_bit_for_bit(mode, tmp_path):
    out = str(tmp_path / f"{mode}.pt")
    cases.run_mode(mode, out)
    got, want = torch.load(out, weights_only=True), torch.load(cases.golden_path(mode), weights_only=True)
    assert len(got) == len(want) == cases.MODES[mode][1]
    for rank, (g, w) in enumerate(zip(got, want)):
        assert g.keys() == w.keys() == {name for name, _ in cases.CASES}
        for case in w:
            assert g[case]["step"] == w[case]["step"] == cases.STEPS
            for part in ("params", "residuals", "velocity"):
                _assert_same(g[case][part], w[case][part], f"{mode}/{case}/rank {rank}/{part}")


def test_golden_files_hold_live_error_feedback():
    """The files are worth guarding: residuals are non-zero, velocities exist where asked."""
    for mode in cases.MODES:
        for rank_result in torch.load(cases.golden_path(mode), weights_only=True):
            for name, options in cases.CASES:
                r = rank_result[name]
                assert any(int(t.count_nonzero()) > 0 for t in r["residuals"].values()), (mode, name)
                assert bool(r["velocity"]) == ("momentum_correction" in options), (mode, name)


# ------------------------------------------------------------------ local SGD and FSDP2 (tests/golden/engines.py)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "golden"))
import engines  # noqa: E402

_PARTS = {"local": ("params", "theta", "error_feedback", "residuals", "momentum"), "fsdp": ("params", "residuals")}


@pytest.mark.parametrize("engine", sorted(engines.ENGINES))
def test_local_sgd_and_fsdp2_equal_the_golden_files_bit_for_bit(engine, tmp_path):
    out = str(tmp_path / f"{engine}.pt")
    engines.run_engine(engine, out)
    got, want = torch.load(out, weights_only=True), torch.load(engines.golden_path(engine), weights_only=True)
    assert len(got) == len(want) == engines.WORLD
    for rank, (g, w) in enumerate(zip(got, want)):
        assert g.keys() == w.keys() == {name for name, _ in engines.ENGINES[engine]}
        for case in w:
            for part in _PARTS[engine]:
                _assert_same(g[case][part], w[case][part], f"{engine}/{case}/rank {rank}/{part}")
            if engine == "local":
                assert g[case]["inner_step"] == w[case]["inner_step"] == engines.STEPS_LOCAL


def test_engine_golden_files_hold_live_state():
    """Worth guarding: sparse cases keep non-zero error feedback and residuals, DiLoCo a momentum,
    ranks end a window apart (mid-window: local parameters differ from theta), FSDP2 residuals live."""
    local = torch.load(engines.golden_path("local"), weights_only=True)
    for name, options in engines.LOCAL_CASES:
        for r in local:
            case = r[name]
            if options.get("outer") == "dense":
                assert case["momentum"] and not case["error_feedback"]["e"].count_nonzero(), name
            else:
                assert int(case["error_feedback"]["e"].count_nonzero()) > 0, name
            flat = torch.cat([p.reshape(-1) for p in case["params"].values()])
            assert not torch.equal(flat, case["theta"]["theta"]), name  # mid-window
        assert all(torch.equal(r[name]["theta"]["theta"], local[0][name]["theta"]["theta"]) for r in local), name
    for r in torch.load(engines.golden_path("fsdp"), weights_only=True):
        for name, _ in engines.FSDP_CASES:
            assert any(int(t.count_nonzero()) > 0 for t in r[name]["residuals"].values()), name
