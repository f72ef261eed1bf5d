"""GradientDistributionMonitor and GaussKTelemetry.

- the statistics functions against numpy/scipy on known distributions;
- argument checks, and what the callbacks do (and do not do) on due and non-due steps;
- two 2-process Lightning fits (tests/scripts/monitor_fit.py, run side by side as subprocesses)
  on a model whose gradients are known exactly: everything that was logged is recomputed here
  from a replay of the hook (u = g + r, exact top-k, residual update) with numpy/scipy, and the
  snapshot, history, PNG and TensorBoard files are checked.
"""

import csv
import importlib.util
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.stats
import torch

from lightning_gaussk import GaussKState, GaussKTelemetry, GradientDistributionMonitor, select, telemetry_figures
from lightning_gaussk.observe.distribution_stats import (
    contraction,
    group_statistics,
    histogram,
    ks_normal,
    moments,
    paper_bound,
    random_k_bound,
    selection_quality,
    topk_threshold,
)
from lightning_gaussk.observe.monitor import load_snapshot

SCRIPT = Path(__file__).parent / "scripts" / "monitor_fit.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _samples() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "normal": rng.normal(0.3, 2.0, 20_000),
        "laplace": rng.laplace(0.0, 0.5, 20_000),
        "student_t3": rng.standard_t(3, 20_000),
        "uniform": rng.uniform(0, 1, 5_000),
    }


# ============================================================================== statistics
@pytest.mark.parametrize("name", ["normal", "laplace", "student_t3", "uniform"])
def test_moments_and_ks_match_scipy(name):
    x = _samples()[name]
    m = moments(torch.from_numpy(x).float())
    xf = x.astype(np.float32).astype(np.float64)  # what the float32 tensor holds
    assert m["mean"] == pytest.approx(xf.mean(), rel=1e-10, abs=1e-12)
    assert m["std"] == pytest.approx(xf.std(ddof=1), rel=1e-10)
    assert m["skewness"] == pytest.approx(scipy.stats.skew(xf), rel=1e-8, abs=1e-10)
    assert m["kurtosis"] == pytest.approx(scipy.stats.kurtosis(xf), rel=1e-8, abs=1e-10)
    ks = ks_normal(torch.from_numpy(xf), m["mean"], m["std"])
    assert ks == pytest.approx(scipy.stats.kstest(xf, "norm", args=(m["mean"], m["std"])).statistic, rel=1e-9)


def test_moments_recognise_the_distributions():
    s = {k: moments(torch.from_numpy(v)) for k, v in _samples().items()}
    assert abs(s["normal"]["kurtosis"]) < 0.15 and abs(s["normal"]["skewness"]) < 0.1
    assert s["laplace"]["kurtosis"] == pytest.approx(3.0, abs=0.4)  # Laplace: excess kurtosis 3
    assert s["uniform"]["kurtosis"] == pytest.approx(-1.2, abs=0.05)
    x = _samples()
    ks = {k: ks_normal(torch.from_numpy(v), s[k]["mean"], s[k]["std"]) for k, v in x.items()}
    assert ks["normal"] < 0.015 < ks["laplace"]


def test_topk_figures_match_numpy():
    x = _samples()["laplace"]
    u = torch.from_numpy(x)
    d, k = x.size, 137
    mags = np.sort(np.abs(x))[::-1]
    assert topk_threshold(u, k) == mags[k - 1]
    assert contraction(u, k) == pytest.approx(1 - (mags[:k] ** 2).sum() / (x**2).sum(), rel=1e-12)
    assert random_k_bound(k, d) == 1 - k / d and paper_bound(k, d) == (1 - k / d) ** 2
    # an exact top-k scores 1/1; a selection sharing half of it scores what numpy says
    top = np.argsort(-np.abs(x))[:k]
    assert selection_quality(u, torch.from_numpy(top), k) == (1.0, 1.0)
    other = np.concatenate([top[: k // 2], np.argsort(-np.abs(x))[k : 2 * k - k // 2]])
    overlap, capture = selection_quality(u, torch.from_numpy(other), k)
    assert overlap == (k // 2) / k
    assert capture == pytest.approx((x[other] ** 2).sum() / (x[top] ** 2).sum(), rel=1e-12)


def test_contraction_at_density_0001_matches_the_papers_synthetic_figures():
    """notes/paper.md: Gaussian 0.987, Laplace 0.968 for k/d = 0.001 (both below (1-k/d)^2 = 0.998)."""
    g = torch.Generator().manual_seed(1)
    d = 400_000
    k = d // 1000
    gauss = torch.randn(d, generator=g)
    lap = torch.empty(d).exponential_(generator=g) - torch.empty(d).exponential_(generator=g)
    assert contraction(gauss, k) == pytest.approx(0.987, abs=0.002)
    assert contraction(lap, k) == pytest.approx(0.968, abs=0.004)
    assert contraction(lap, k) < contraction(gauss, k) < paper_bound(k, d) < random_k_bound(k, d)


def test_histogram_matches_numpy():
    x = _samples()["normal"]
    counts, under, over = histogram(torch.from_numpy(x), 30, -3.0, 4.0)
    ref, _ = np.histogram(x.astype(np.float32), bins=30, range=(-3.0, 4.0))
    assert np.abs(counts.numpy() - ref).sum() <= 2  # float32 bin edges may move a boundary value
    assert under == int((x < -3).sum()) and over == int((x > 4).sum())
    assert int(counts.sum()) + under + over == x.size


def test_group_statistics_gaussian_threshold_and_residual_ratio():
    g = torch.Generator().manual_seed(2)
    d, k = 200_000, 2_000
    grad = torch.randn(d, generator=g) * 0.5
    residual = torch.randn(d, generator=g) * 0.25
    u = grad + residual
    st = group_statistics(u, k, grad=grad)
    x = u.double().numpy()
    t = abs(x.mean()) + x.std(ddof=1) * scipy.stats.norm.ppf(1 - (k / d) / 2)
    assert st["threshold_gauss"] == pytest.approx(t, rel=1e-6)
    assert st["frac_above_gauss"] == pytest.approx(float((np.abs(x) > t).mean()), abs=1 / d)
    assert st["frac_above_gauss"] == pytest.approx(k / d, rel=0.15)  # zero-mean Gaussian data: on target
    assert st["threshold_topk"] == pytest.approx(t, rel=0.03)
    r = (u.double() - grad.double()).numpy()
    assert st["residual_ratio"] == pytest.approx(np.linalg.norm(r) / np.linalg.norm(grad.double().numpy()), rel=1e-9)
    assert st["density"] == k / d and "overlap" not in st
    with pytest.raises(ValueError, match="k"):
        group_statistics(u, 0)


# ============================================================================== arguments
@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"every_n_steps": 0}, ValueError, "every_n_steps"),
        ({"every_n_steps": 2.0}, TypeError, "every_n_steps"),
        ({"ranks": "some"}, ValueError, "ranks"),
        ({"ranks": 0}, TypeError, "ranks"),
        ({"per_parameter": 1}, TypeError, "per_parameter"),
        ({"max_samples": 1}, ValueError, "max_samples"),
        ({"bins": 0}, ValueError, "bins"),
        ({"save_dir": 3}, TypeError, "save_dir"),
        ({"plot": "yes"}, TypeError, "plot"),
        ({"density": 0.0}, ValueError, "density"),
        ({"density": "0.1"}, TypeError, "density"),
        ({"selector": "bogus"}, ValueError, "selector"),
        ({"hist_range": -1.0}, ValueError, "hist_range"),
        ({"log_histograms": None}, TypeError, "log_histograms"),
        ({"prefix": ""}, TypeError, "prefix"),
        ({"seed": 1.5}, TypeError, "seed"),
    ],
)
def test_monitor_rejects_bad_arguments_naming_them(kwargs, error, name):
    with pytest.raises(error, match=name):
        GradientDistributionMonitor(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"prog_bar": "density"}, TypeError, "prog_bar"),
        ({"prog_bar": ["nope"]}, ValueError, "prog_bar"),
        ({"residual_norm_every_n_steps": -1}, ValueError, "residual_norm_every_n_steps"),
        ({"residual_norm_every_n_steps": True}, TypeError, "residual_norm_every_n_steps"),
    ],
)
def test_telemetry_rejects_bad_arguments_naming_them(kwargs, error, name):
    with pytest.raises(error, match=name):
        GaussKTelemetry(**kwargs)


def test_telemetry_figures_are_differences_of_the_counters():
    before = {"hook_calls": 3, "bytes_sent": 100, "bytes_dense": 4000, "entries_sent": 10, "entries_total": 1000,
              "select_ns": 0, "comm_ns": 0, "hook_ns": 0, "skipped_buckets": 0}
    after = dict(before, hook_calls=5, bytes_sent=100 + 2 * 84, bytes_dense=4000 + 8000, entries_sent=10 + 20,
                 entries_total=1000 + 2000, select_ns=3_000_000, comm_ns=1_000_000, hook_ns=4_000_000, skipped_buckets=1)
    f = telemetry_figures(before, after, world_size=4)
    assert f["bytes_sent"] == 168 and f["bytes_dense"] == 8000 and f["compression"] == 8000 / 168
    assert f["traffic_vs_allreduce"] == pytest.approx(3 * 168 / (2 * 3 / 4 * 8000))
    assert f["density"] == 0.01 and f["select_ms"] == 3.0 and f["comm_ms"] == 1.0 and f["hook_ms"] == 4.0
    assert f["hook_calls"] == 2 and f["skipped_buckets"] == 1
    assert telemetry_figures(after, after, 4) == {}  # the hook did not run
    assert "select_ms" not in telemetry_figures(before, dict(after, select_ns=0, comm_ns=0, hook_ns=0), 4)  # untimed (GPU)
    assert "traffic_vs_allreduce" not in telemetry_figures(before, after, 1)
    assert "bytes_intra" not in f  # flat mode


def test_local_sgd_figures_are_cumulative_and_time_only_an_outer_step():
    from lightning_gaussk.observe.telemetry import local_sgd_figures

    before = {"inner_steps": 15, "outer_steps": 0, "skipped_outer_steps": 0, "bytes_sent": 0, "outer_ns": 0}
    after = {"inner_steps": 16, "outer_steps": 1, "skipped_outer_steps": 0, "bytes_sent": 4000, "outer_ns": 3_000_000}
    assert local_sgd_figures(before, after, 0) == {
        "outer_steps": 1.0, "skipped_outer_steps": 0.0, "bytes_per_inner_step": 250.0, "window_position": 0.0, "outer_ms": 3.0,
    }  # fmt: skip
    later = dict(after, inner_steps=17)
    assert "outer_ms" not in local_sgd_figures(after, later, 1)  # no outer step in between
    assert local_sgd_figures(after, after, 0) == {}  # no optimizer step in between


def test_telemetry_figures_in_node_mode_count_intra_and_inter_node_traffic():
    before = {"hook_calls": 0, "bytes_sent": 0, "bytes_dense": 0, "entries_sent": 0, "entries_total": 0,
              "bytes_intra": 0, "bytes_inter": 0, "intra_ns": 0, "inter_ns": 0, "decode_ns": 0, "hook_ns": 0}  # fmt: skip
    after = {"hook_calls": 2, "bytes_sent": 100, "bytes_dense": 4000, "entries_sent": 20, "entries_total": 1000,
             "bytes_intra": 6000, "bytes_inter": 100, "intra_ns": 3_000_000, "inter_ns": 2_000_000,
             "decode_ns": 500_000, "hook_ns": 6_000_000}  # fmt: skip
    f = telemetry_figures(before, after, world_size=8, nodes=2)  # 2 nodes x 4 ranks
    assert f["bytes_intra"] == 6000 and f["bytes_inter"] == 100
    assert (f["intra_ms"], f["inter_ms"], f["decode_ms"]) == (3.0, 2.0, 0.5)
    assert f["traffic_vs_allreduce"] == (2 - 1) * 100 / (2 * 7 / 8 * 4000)  # one other node's message, not W - 1


def _fake_trainer(step: int, state: GaussKState | None, rank: int = 0) -> SimpleNamespace:
    strategy = SimpleNamespace(gaussk_state=state) if state is not None else SimpleNamespace()
    return SimpleNamespace(global_step=step, global_rank=rank, strategy=strategy, world_size=2, loggers=[])


def test_monitor_asks_the_hook_for_nothing_on_steps_that_are_not_due():
    state = GaussKState(density=0.01)
    mon = GradientDistributionMonitor(every_n_steps=5, save_dir=None)
    mon._active, mon.mode = True, "gaussk"
    module = torch.nn.Linear(3, 3)
    for step in (0, 1, 2, 3, 5, 6):
        mon.on_train_batch_start(_fake_trainer(step, state), module, None, 0)
        assert not state._capture_next and not state._norms_next
        mon.on_before_optimizer_step(_fake_trainer(step, state), module, None)
    mon.on_train_batch_start(_fake_trainer(4, state), module, None, 0)
    assert state._capture_next  # (4 + 1) % 5 == 0
    # "zero": another rank never asks
    other = GaussKState(density=0.01)
    mon1 = GradientDistributionMonitor(every_n_steps=1, ranks="zero")
    mon1.setup(SimpleNamespace(log_dir="/nonexistent", default_root_dir="/nonexistent", global_rank=1), module, "fit")
    mon1.mode = "gaussk"
    mon1.on_train_batch_start(_fake_trainer(0, other, rank=1), module, None, 0)
    assert not other._capture_next


def test_density_and_selector_are_refused_under_gaussk():
    for kwargs in ({"density": 0.01}, {"selector": "topk"}):
        mon = GradientDistributionMonitor(**kwargs)
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            mon.on_train_start(_fake_trainer(0, GaussKState()), torch.nn.Linear(2, 2))


def test_telemetry_warns_without_gaussk_state():
    tel = GaussKTelemetry()
    with pytest.warns(UserWarning, match="no GaussK hook state"):
        tel.on_train_start(_fake_trainer(0, None), torch.nn.Linear(2, 2))
    tel.on_before_optimizer_step(_fake_trainer(0, None), torch.nn.Linear(2, 2), None)  # inert
    assert tel.last == {}


# ============================================================================== 2-process fits
def _script_module():
    spec = importlib.util.spec_from_file_location("monitor_fit", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


FITS = {
    # GaussK, every rank analysed, per parameter, residual norms from the telemetry every 2 steps
    "gaussk": ["--strategy", "gaussk", "--density", "0.01", "--max-steps", "8", "--every", "3", "--ranks", "all",
               "--per-parameter", "--norms-every", "2"],
    # plain DDP with accumulation: u must be the LOCAL accumulated gradient, not the average
    "ddp": ["--strategy", "ddp", "--density", "0.02", "--selector", "randk", "--max-steps", "6", "--every", "3",
            "--ranks", "zero", "--accumulate", "2"],
}


@pytest.fixture(scope="module")
def fits(tmp_path_factory):
    """Both fits side by side (each is 2 processes; mostly start-up time)."""
    root = tmp_path_factory.mktemp("monitor_fits")
    procs = {}
    for name, args in FITS.items():
        out = root / name
        out.mkdir()
        procs[name] = (out, subprocess.Popen([sys.executable, str(SCRIPT), "--out", str(out), *args], cwd=out,
                                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    results = {}
    for name, (out, proc) in procs.items():
        log, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, log[-4000:]
        records = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
        results[name] = SimpleNamespace(out=out, log=log, records=records, metrics=_read_csv(out / "csv" / "version_0" / "metrics.csv"))
    return results


def _read_csv(path: Path) -> dict[tuple[int, str], float]:
    values: dict[tuple[int, str], float] = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            step = int(row["step"])
            for key, v in row.items():
                if key not in ("step", "epoch") and v != "":
                    values[(step, key)] = float(v)
    return values


def _expected(u: np.ndarray, k: int, *, selected: np.ndarray | None = None, grad: np.ndarray | None = None) -> dict[str, float]:
    """The monitor's figures, recomputed with numpy/scipy (KS separately: it uses the sample)."""
    u = u.astype(np.float64)
    d = u.size
    mags = np.abs(u)
    order = np.argsort(-mags)
    top = order[:k]
    mean, std = u.mean(), u.std(ddof=1)
    tg = abs(mean) + std * scipy.stats.norm.ppf(1 - (k / d) / 2)
    out = {
        "density": k / d, "mean": mean, "std": std, "skewness": scipy.stats.skew(u), "kurtosis": scipy.stats.kurtosis(u),
        "threshold_topk": mags[order[k - 1]], "threshold_gauss": tg, "frac_above_gauss": float((mags > tg).mean()),
        "contraction": 1 - (u[top] ** 2).sum() / (u**2).sum(), "bound_randk": 1 - k / d, "bound_paper": (1 - k / d) ** 2,
    }
    if selected is not None:
        out["overlap"] = len(np.intersect1d(selected, top)) / k
        out["norm_capture"] = (u[selected] ** 2).sum() / (u[top] ** 2).sum()
    if grad is not None:
        out["residual_ratio"] = np.linalg.norm(u - grad) / np.linalg.norm(grad)
    return out


def _close(got: float, want: float, what: str) -> None:
    assert got == pytest.approx(want, rel=1e-5, abs=1e-9), what


def _check_files(rec: dict, max_samples: int, bins: int) -> None:
    d = Path(rec["dirpath"])
    assert d.name == "gaussk_monitor" and d.parent.name == "version_0"  # inside trainer.log_dir
    for path in rec["figures"]:
        data = Path(path).read_bytes()
        assert data[:8] == PNG_MAGIC and 5_000 < len(data) < 1_000_000, path
        import matplotlib.image

        img = matplotlib.image.imread(path)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
    assert any("contraction" in p for p in rec["figures"]) and any("distribution" in p for p in rec["figures"])
    for path in rec["snapshots"]:
        assert Path(path).stat().st_size < 64_000  # bounded: no whole gradients
        snap = load_snapshot(path)  # weights_only
        assert snap["rank"] == rec["rank"]
        for name, g in snap["groups"].items():
            assert g["sample"].numel() == min(max_samples, g["d"])
            assert g["hist_counts"].shape == (bins,)
            assert int(g["hist_counts"].sum()) + g["underflow"] + g["overflow"] == g["d"]
    hist = torch.load(d / f"history_rank{rec['rank']}.pt", weights_only=True)
    assert hist["rows"] == rec["history"]


def test_gaussk_fit_logs_what_an_independent_replay_of_the_hook_computes(fits):
    run = fits["gaussk"]
    mf = _script_module()
    density, steps, every = 0.01, 8, 3
    d_a, d_b = mf.D_A, mf.D_B
    d = d_a + d_b
    k = math.ceil(density * d)
    due = [s for s in range(steps) if (s + 1) % every == 0]
    for rank in range(2):
        rec = run.records[rank]
        assert rec["mode"] == "gaussk" and rec["global_step"] == steps
        snaps = {load_snapshot(p)["step"]: load_snapshot(p) for p in rec["snapshots"]}
        assert sorted(snaps) == due
        residual = np.zeros(d, dtype=np.float32)  # order [a, b]; the figures do not depend on the order
        telemetry = dict(rec["telemetry"])
        for step in range(steps):
            xa, xb = mf.known_grads(step, 0, rank)
            g = np.concatenate([xa.numpy(), xb.numpy()])
            u = residual + g  # float32, as the hook adds
            top = np.argsort(-np.abs(u))[:k]  # "gaussk" on CPU is an exact top-k
            # per-step telemetry
            t = telemetry[step]
            assert t["bytes_sent"] == (2 * k + 1) * 4 and t["bytes_dense"] == d * 4
            assert t["density"] == k / d and t["hook_calls"] == 1 and t["skipped_buckets"] == 0
            assert t["traffic_vs_allreduce"] == pytest.approx(2 * (2 * k + 1) * 4 / (2 * d * 4))
            assert t["select_ms"] > 0 and t["comm_ms"] > 0 and t["hook_ms"] >= t["select_ms"]
            if (step + 1) % 2 == 0:
                _close(t["residual_ratio"], np.linalg.norm(residual.astype(np.float64)) / np.linalg.norm(g.astype(np.float64)), "telemetry residual_ratio")
            else:
                assert "residual_ratio" not in t
            if step in due:
                snap = snaps[step]
                groups = {
                    "bucket0": (u, k, top, g, snap["groups"]["bucket0"]),
                    "param/a": (u[:d_a], math.ceil(density * d_a), None, g[:d_a], snap["groups"]["param/a"]),
                    "param/b": (u[d_a:], math.ceil(density * d_b), None, g[d_a:], snap["groups"]["param/b"]),
                }
                assert set(snap["groups"]) == set(groups)
                for name, (uu, kk, sel, gg, saved) in groups.items():
                    want = _expected(uu, kk, selected=sel, grad=gg)
                    # KS: on the saved sample, which must be entries of this u
                    sample = saved["sample"].numpy()
                    assert np.isin(sample, uu).all()
                    want["ks"] = scipy.stats.kstest(sample.astype(np.float64), "norm", args=(want["mean"], want["std"])).statistic
                    if name.startswith("param/"):
                        lo, hi = (0, d_a) if name == "param/a" else (d_a, d)
                        want["selected_density"] = float(((top >= lo) & (top < hi)).sum()) / (hi - lo)
                    assert set(saved["stats"]) == set(want), name
                    for key, value in want.items():
                        _close(saved["stats"][key], value, f"rank {rank} step {step} {name} {key} (snapshot)")
                        _close(run.metrics[(step, f"gaussk/rank{rank}/{name}/{key}")], value, f"rank {rank} step {step} {name} {key} (logged)")
                    ref, _ = np.histogram(uu, bins=40, range=(saved["hist_lo"], saved["hist_hi"]))
                    assert np.abs(saved["hist_counts"].numpy() - ref).sum() <= 2
                assert snap["groups"]["bucket0"]["stats"]["overlap"] == 1.0
            residual = u.copy()
            residual[top] = 0.0
        _check_files(rec, max_samples=512, bins=40)
    # histograms went to TensorBoard, for both ranks (gathered on rank 0)
    events = b"".join(p.read_bytes() for p in (run.out / "tb" / "version_0").glob("events.out.tfevents.*"))
    for rank in range(2):
        assert f"gaussk/rank{rank}/bucket0/u".encode() in events
    # telemetry reached the logger too (rank 0's, through self.log)
    logged = [v for (_, key), v in run.metrics.items() if key == "gaussk/density"]
    assert logged and all(v == pytest.approx(k / d, rel=1e-6) for v in logged)  # self.log stores float32


def test_plain_ddp_fit_measures_the_local_accumulated_gradient(fits):
    run = fits["ddp"]
    mf = _script_module()
    density, steps, every = 0.02, 6, 3
    d = mf.D_A + mf.D_B
    k = math.ceil(density * d)
    assert "no GaussK hook state" in run.log  # GaussKTelemetry under plain DDP says so
    rec0, rec1 = run.records
    assert rec0["mode"] == "local" and rec0["global_step"] == steps
    assert rec1["history"] == [] and rec1["snapshots"] == []  # ranks="zero"
    due = [s for s in range(steps) if (s + 1) % every == 0]
    assert sorted({r["step"] for r in rec0["history"]}) == due
    for step in due:
        parts = [mf.known_grads(step, micro, 0) for micro in range(2)]
        # Lightning scales the loss by 1/2; .grad accumulates the two micro-batches locally
        g = [(p0 / 2 + p1 / 2).numpy() for p0, p1 in zip(*parts)]
        u = np.concatenate(g)  # named_parameters order: a, b
        sel = select(torch.from_numpy(u), k, "randk", seed=0, step=step)[1].numpy()
        want = _expected(u, k, selected=sel)
        snap = load_snapshot(Path(rec0["dirpath"]) / "snapshots" / f"rank0_step{step:07d}.pt")
        saved = snap["groups"]["model"]
        want["ks"] = scipy.stats.kstest(saved["sample"].numpy().astype(np.float64), "norm", args=(want["mean"], want["std"])).statistic
        assert set(saved["stats"]) == set(want)
        for key, value in want.items():
            _close(run.metrics[(step, f"gaussk/model/{key}")], value, f"step {step} {key}")
        # not what the optimizer saw (the average over ranks): that one is narrower
        other = [mf.known_grads(step, micro, 1) for micro in range(2)]
        avg = (u + np.concatenate([(p0 / 2 + p1 / 2).numpy() for p0, p1 in zip(*other)])) / 2
        assert abs(saved["stats"]["std"] - avg.std(ddof=1)) > 0.1 * avg.std(ddof=1)
        assert saved["stats"]["overlap"] < 0.2  # Random-k shares ~k/d of the top-k
    assert not any("rank1" in key for _, key in run.metrics)
    _check_files(rec0, max_samples=512, bins=40)


# ============================================================================== in process
def test_single_device_fit_measures_the_gradient_and_draws(tmp_path):
    """No DDP at all: u is p.grad, analysed per parameter too; files land in the logger's log_dir."""
    import pickle

    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    mf = _script_module()
    mon = GradientDistributionMonitor(every_n_steps=2, ranks="all", per_parameter=True, max_samples=256, bins=20,
                                      density=0.05, selector="topk")
    pickle.dumps(mon)  # spawn pickles callbacks
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=4, logger=CSVLogger(tmp_path, name="csv", version=0),
                        callbacks=[mon], enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(mf.Known(), torch.utils.data.DataLoader(torch.zeros(64, 1), batch_size=1))
    assert mon.mode == "local" and sorted({r["step"] for r in mon.history}) == [1, 3]
    metrics = _read_csv(tmp_path / "csv" / "version_0" / "metrics.csv")
    d = mf.D_A + mf.D_B
    k = math.ceil(0.05 * d)
    for step in (1, 3):
        xa, xb = mf.known_grads(step, 0, 0)
        u = np.concatenate([xa.numpy(), xb.numpy()])
        top = np.argsort(-np.abs(u))[:k]
        for name, (uu, kk, sel) in {"model": (u, k, top), "param/a": (u[: mf.D_A], math.ceil(0.05 * mf.D_A), None),
                                    "param/b": (u[mf.D_A :], math.ceil(0.05 * mf.D_B), None)}.items():
            want = _expected(uu, kk, selected=sel)
            for key, value in want.items():
                _close(metrics[(step, f"gaussk/rank0/{name}/{key}")], value, f"{step} {name} {key}")
    assert len(mon.figure_paths) == 3 and all(Path(p).read_bytes()[:8] == PNG_MAGIC for p in mon.figure_paths)
    assert all(Path(p).parent.parent == tmp_path / "csv" / "version_0" for p in mon.figure_paths)
