"""The docs' code runs as written (issue 26).

- The table of registered strategy names in docs/index.md is checked against Lightning's
  ``StrategyRegistry`` (after ``import lightning_gaussk``) and the config dataclasses' defaults;
  the option tables of docs/configuration.md against ``GaussKConfig`` and ``LocalSGDConfig``.
- Every fenced ```python block of the pages in ``PAGES`` (every docs page with python blocks, and
  README.md) either carries a marker
  ``<!-- snippet: NAME -->`` on the line above it and is run here, or starts with a
  ``# fragment: ...`` comment that says what it needs. A block with neither fails.
- The marked blocks run as the page says: single-process ones in this process (``runpy``), the
  multi-process ones through the page's own marked ```bash block (``<!-- snippet: NAME.sh -->``):
  ``torchrun`` of the saved block on CPU processes (gloo), and the Lightning FSDP2 job as two
  "node" processes with ``MASTER_ADDR``/``MASTER_PORT``/``NODE_RANK`` (MASTER_PORT replaced by a free
  port). Each multi-process run is one test with all its assertions. A marker's note ``given
  NAMES`` says which names the page leaves to the reader (``Net``, ``loader``, a ``local`` of an
  earlier block); the test supplies those and runs the block unchanged.
- Every ```yaml block of docs/cli.md is parsed by LightningCLI (jsonargparse) and instantiates
  the strategy with the options it gives.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import os
import re
import runpy
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import lightning_gaussk
from lightning_gaussk.config import GaussKConfig, LocalSGDConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
#: the pages whose python blocks must each be run here or marked a fragment: under docs/, and README.md
PAGES = ("index.md", "fsdp.md", "accelerate.md", "raw_ddp.md", "configuration.md", "local-sgd.md", "checkpointing.md",
         "monitor.md", "preflight.md", "reliability.md", "scale-out.md", "convergence.md", "benchmarks.md",
         "transformers.md", "fabric.md", "README.md")  # fmt: skip
MARKER = re.compile(r"^<!-- (snippet|yaml): (\S+)(?: (.*?))? -->$")
FRAGMENT = "# fragment:"
#: the python snippets the tests below run (test_every_python_block_is_run_or_marked_a_fragment checks the pages
#: mark exactly these)
RUN = {
    "index_quickstart.py": "test_index_quickstart_builds_the_trainers",
    "index_select.py": "test_index_selection_selects_exactly_k",
    "fsdp_raw.py": "test_fsdp_raw_script_with_torchrun_on_cpu",
    "fsdp_lightning.py": "test_fsdp_lightning_as_two_nodes_of_two_devices",
    "fsdp_accelerate.py": "test_fsdp_accelerate_recipe_with_torchrun_on_cpu",
    "accelerate_quickstart.py": "test_accelerate_quickstart_with_torchrun_on_cpu",
    "raw_ddp.py": "test_raw_ddp_script_and_checkpoint_block_with_torchrun_on_cpu",
    "raw_ddp_checkpoint.py": "test_raw_ddp_script_and_checkpoint_block_with_torchrun_on_cpu",
    "local_sgd_raw.py": "test_local_sgd_raw_loop_and_local_checkpoint_in_one_process",
    "checkpointing_local_sgd.py": "test_local_sgd_raw_loop_and_local_checkpoint_in_one_process",
    "local_sgd_streaming.py": "test_local_sgd_streaming_overlapped_in_one_process",
}
TIMEOUT = 300  # seconds per multi-process run (30-50 s measured on 2 shared cores)


# ------------------------------------------------------------------------------ reading the pages
@dataclasses.dataclass(frozen=True)
class Block:
    page: str
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    kind: str | None  # "snippet" or "yaml" when marked
    name: str | None
    note: str | None


def page_path(page: str) -> Path:
    """``docs/<page>``, or README.md at the repository's root."""
    return ROOT / page if page == "README.md" else DOCS / page


def blocks(page: str) -> list[Block]:
    """The fenced blocks of ``docs/<page>`` (or README.md), each with the marker on the line above it, if any."""
    lines = page_path(page).read_text().splitlines()
    out, start = [], None
    for n, line in enumerate(lines):
        if not line.startswith("```"):
            continue
        if start is None:
            start = n
            continue
        marker = MARKER.match(lines[start - 1]) if start else None
        kind, name, note = marker.groups() if marker else (None, None, None)
        out.append(Block(page, start + 1, lines[start][3:].strip(), "\n".join(lines[start + 1 : n]) + "\n", kind, name, note))
        start = None
    assert start is None, f"{page_path(page).relative_to(ROOT)}: a fence opened at line {start + 1} is not closed"
    return out


def snippet(name: str) -> Block:
    found = [b for page in PAGES for b in blocks(page) if b.kind == "snippet" and b.name == name]
    assert len(found) == 1, f"<!-- snippet: {name} --> marks {len(found)} blocks in {PAGES}"
    return found[0]


def commands(name: str) -> list[tuple[dict[str, str], list[str]]]:
    """The commands of a marked bash block: (environment assignments, argv) per line; ``&``,
    ``wait`` and comments dropped."""
    out = []
    for line in snippet(name).code.splitlines():
        line = line.split("#")[0].strip().removesuffix("&").strip()
        if not line or line == "wait":
            continue
        words = shlex.split(line)
        env = {}
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
            key, value = words.pop(0).split("=", 1)
            env[key] = value
        out.append((env, words))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GAUSSK_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


def _argv(words: list[str]) -> list[str]:
    head = {"torchrun": [sys.executable, "-m", "torch.distributed.run"], "python": [sys.executable]}
    assert words[0] in head, words
    return head[words[0]] + words[1:]


def run_commands(name: str, cwd: Path, env_override: dict[str, str] | None = None) -> list[str]:
    """Start every command of bash block ``name`` at once in ``cwd`` (their scripts saved there
    beforehand), wait for all, and return their outputs; each must exit with 0."""
    procs = []
    with contextlib.ExitStack() as stack:
        for i, (env, words) in enumerate(commands(name)):
            log = stack.enter_context(open(cwd / f"{name}.{i}.log", "w+"))
            proc = subprocess.Popen(_argv(words), cwd=cwd, env=_env({**env, **(env_override or {})}), stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
            procs.append((proc, log))
        outs = []
        try:
            deadline = time.monotonic() + TIMEOUT
            while time.monotonic() < deadline and any(p.poll() is None for p, _ in procs):
                if any(p.poll() for p, _ in procs):  # one failed: the others would wait for it
                    break
                time.sleep(0.2)
        finally:
            for proc, log in procs:
                with contextlib.suppress(ProcessLookupError):  # its whole group: the launcher's children too
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                log.seek(0)
                outs.append(log.read())
    failed = [f"{proc.args} exited with {proc.returncode}\n{out[-3000:]}" for (proc, _), out in zip(procs, outs) if proc.returncode]
    assert not failed, f"{name}:\n" + "\n".join(failed)
    return outs


def save(cwd: Path, name: str, code: str | None = None) -> Path:
    path = cwd / name
    path.write_text(snippet(name).code if code is None else code)
    return path


# ------------------------------------------------------------------------------ every block accounted for
def test_every_python_block_is_run_or_marked_a_fragment():
    marked, unaccounted = [], []
    for page in PAGES:
        for b in blocks(page):
            if b.lang != "python":
                continue
            where = f"{page_path(page).relative_to(ROOT)}:{b.line}"
            if b.code.startswith(FRAGMENT):
                assert b.kind is None, f"{where} is marked both a fragment and a snippet"
            elif b.kind == "snippet":
                marked.append(b.name)
            else:
                unaccounted.append(where)
    assert unaccounted == [], f"python blocks neither run by this file (<!-- snippet: NAME -->) nor marked '{FRAGMENT} ...'"
    assert sorted(marked) == sorted(RUN)  # each marked block once, each run here
    this = Path(__file__).read_text()
    assert all(f"def {test}(" in this for test in RUN.values())


def test_the_shell_commands_name_the_saved_snippets():
    assert [words for _, words in commands("fsdp_raw.sh")] == [["torchrun", "--standalone", "--nproc-per-node", "4", "fsdp_raw.py"]]
    nodes = commands("fsdp_lightning.sh")
    assert sorted(env["NODE_RANK"] for env, _ in nodes) == ["0", "1"]
    assert all(words == ["python", "fsdp_lightning.py"] and {"MASTER_ADDR", "MASTER_PORT"} <= set(env) for env, words in nodes)
    assert len({(env["MASTER_ADDR"], env["MASTER_PORT"]) for env, _ in nodes}) == 1  # one job
    assert commands("fsdp_accelerate.sh")[0][1][-1] == "fsdp_accelerate.py"
    assert commands("raw_ddp.sh")[0][1][-1] == "raw_ddp.py"
    assert commands("accelerate_quickstart.sh")[0][1][-1] == "train.py"


# ------------------------------------------------------------------------------ the table of registered names
def _table_rows() -> list[dict[str, str]]:
    lines = (DOCS / "index.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("<!-- strategy-defaults"))
    rows = []
    for line in lines[start + 3 :]:  # marker, header, separator
        if not line.startswith("|"):
            break
        name, cls, sets, defaults, launcher = (c.strip() for c in line.strip().strip("|").split("|"))
        rows.append({"name": name.strip("`"), "class": cls.strip("`"), "sets": sets, "defaults": defaults, "launcher": launcher})
    return rows


def _pairs(cell: str) -> dict[str, object]:
    return {k: ast.literal_eval(v) for k, v in re.findall(r"`(\w+)=([^`]+)`", cell)}


def _config(strategy):
    return getattr(strategy, "local_config", None) or strategy.gaussk_config


def effective(strategy, key: str):
    """What a built strategy uses for option ``key``."""
    config = _config(strategy)
    if key in {f.name for f in dataclasses.fields(config)}:
        return getattr(config, key)
    if key == "start_method":
        return strategy._start_method
    if key == "save_distributed_checkpoint":
        return strategy._save_distributed_checkpoint
    return strategy._ddp_kwargs.get(key)


def test_the_table_of_registered_names_matches_the_registry_and_the_config_defaults(monkeypatch):
    from lightning.pytorch.strategies import StrategyRegistry

    for var in [v for v in os.environ if v.startswith("GAUSSK_")]:
        monkeypatch.delenv(var)
    rows = _table_rows()
    ours = {n for n in StrategyRegistry.available_strategies() if StrategyRegistry[n]["strategy"].__module__.startswith("lightning_gaussk")}
    names = [r["name"] for r in rows]
    assert len(names) == len(set(names)) and set(names) == ours  # every registered name, once
    for row in rows:
        name, entry = row["name"], StrategyRegistry[row["name"]]
        assert entry["strategy"].__name__ == row["class"], name
        assert getattr(lightning_gaussk, row["class"]) is entry["strategy"]
        sets = {} if row["sets"] == "—" else _pairs(row["sets"])
        assert sets == entry["init_params"], name  # exactly what the registration passes
        defaults = _pairs(row["defaults"])
        strategy = StrategyRegistry.get(name)  # built as Trainer(strategy=name) builds it
        config_cls = type(_config(strategy))
        assert config_cls is (LocalSGDConfig if "Local" in row["class"] else GaussKConfig)
        field_defaults = {f.name: f.default for f in dataclasses.fields(config_cls)}
        for key, value in {**defaults, **sets}.items():
            assert effective(strategy, key) == value, (name, key)
        for key, value in defaults.items():
            assert key in field_defaults and key not in sets, (name, key)
            assert field_defaults[key] == value, (name, key)  # the dataclass default, unchanged by the name
        dense_outer = config_cls is LocalSGDConfig and effective(strategy, "outer") == "dense"  # density unused
        assert "density" in defaults or dense_outer, f"{name}: the table must give its density"
        launcher = row["launcher"].split(";")[0].split()[0]
        assert launcher == getattr(strategy, "_start_method", "popen"), name
    assert "Every registered name uses the default density" not in (DOCS / "index.md").read_text()


def _option_table(text: str, header: str) -> dict[str, tuple[str, object]]:
    """``option -> (variable, default)`` of the markdown table that starts with ``header``."""
    lines = text.splitlines()
    start = lines.index(header)
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0].strip("`")] = (cells[1].strip("`"), ast.literal_eval(cells[2].strip("`")))
    return rows


@pytest.mark.parametrize(
    ("config_cls", "header"),
    [(GaussKConfig, "| option | variable | default | allowed | meaning |"), (LocalSGDConfig, "| option | variable | default | meaning |")],
    ids=["GaussKConfig", "LocalSGDConfig"],
)
def test_configuration_md_tables_list_every_option_with_its_variable_and_default(config_cls, header):
    table = _option_table((DOCS / "configuration.md").read_text(), header)
    fields = {f.name: ("GAUSSK_" + f.name.upper(), f.default) for f in dataclasses.fields(config_cls)}
    assert list(table) == list(fields)  # every option, in declaration order
    assert table == fields


def test_accelerate_md_table_lists_every_option_with_its_variable_and_default():
    lines = (DOCS / "accelerate.md").read_text().splitlines()
    start = lines.index("| keyword | environment variable | values | default |")
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        keyword, variable, _, default = (c.strip().strip("`") for c in line.strip().strip("|").split("|"))
        rows[keyword] = (variable, default)
    def as_text(value) -> str:  # as the variable is written
        return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)

    fields = {f.name: ("GAUSSK_" + f.name.upper(), as_text(f.default)) for f in dataclasses.fields(GaussKConfig)}
    assert [k for k in rows if k in fields] == list(fields)  # every option, in declaration order
    assert {k: rows[k] for k in fields} == fields


# ------------------------------------------------------------------------------ single-process snippets
@pytest.fixture
def clean(monkeypatch, tmp_path):
    for var in [v for v in os.environ if v.startswith("GAUSSK_")]:
        monkeypatch.delenv(var)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_index_quickstart_builds_the_trainers(clean):
    ns = runpy.run_path(str(save(clean, "index_quickstart.py")), run_name="__main__")
    strategy = ns["trainer"].strategy
    assert isinstance(strategy, lightning_gaussk.GaussKDDPStrategy)
    assert strategy.gaussk_config.density == 0.01 and strategy.gaussk_config.selector == "gaussk"
    assert ns["trainer"].num_devices == 2
    code = snippet("index_quickstart.py").code
    lines = code.splitlines(keepends=True)
    first = "".join(lines[: next(i for i, ln in enumerate(lines) if ln.startswith("trainer = ")) + 1])  # up to the first Trainer
    ns = runpy.run_path(str(save(clean, "first.py", first)), run_name="__main__")
    assert ns["trainer"].strategy.gaussk_config.density == 0.001  # as its comment and the table say


def test_index_selection_selects_exactly_k(clean, capsys):
    ns = runpy.run_path(str(save(clean, "index_select.py")), run_name="__main__")
    x, values, indices = ns["x"], ns["values"], ns["indices"]
    assert indices.shape == (100,) and indices.unique().numel() == 100
    assert torch.equal(values, x[indices])
    assert values.abs().min() > x.abs().median()  # large entries
    printed = ast.literal_eval(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"dgc", "gaussk", "randk", "topk"} <= set(printed)


def given(name: str) -> set[str]:
    """The names the marker's ``given ...`` note says the page leaves to the reader."""
    note = snippet(name).note or ""
    assert note.startswith("given "), f"<!-- snippet: {name} --> runs with names from outside it: its note must say which"
    return set(re.findall(r"\w+", note.removeprefix("given ").split(" from ")[0])) - {"and"}


class _Net(torch.nn.Sequential):  # the docs' ``Net()``: four modules with parameters (room for 4 fragments)
    def __init__(self) -> None:
        super().__init__(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8), torch.nn.Tanh(),
                         torch.nn.Linear(8, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))  # fmt: skip


def _loader(batches: int = 48) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(32, 8, generator=g) for _ in range(batches)]
    return [(x, x[:, :1] * 2 - x[:, 1:2]) for x in xs]


def _run_given(name: str, cwd: Path, **names) -> dict:
    assert set(names) == given(name), (name, sorted(names))  # exactly what the marker says the page leaves out
    return runpy.run_path(str(save(cwd, name)), init_globals=names, run_name="__main__")


def test_local_sgd_raw_loop_and_local_checkpoint_in_one_process(clean):
    # docs/local-sgd.md, one process and no process group: SparseLocalSGD warns that nothing is
    # exchanged and trains; then docs/checkpointing.md saves and restores that ``local``
    loss_fn = torch.nn.functional.mse_loss
    loader = _loader()
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="nothing is exchanged"):
        ns = _run_given("local_sgd_raw.py", clean, Net=_Net, loader=loader, loss_fn=loss_fn)
    local, model = ns["local"], ns["model"]
    assert isinstance(local, lightning_gaussk.SparseLocalSGD) and isinstance(model, _Net)
    tel = local.telemetry
    assert tel["inner_steps"] == len(loader) and tel["outer_steps"] == len(loader) // 16  # H = sync_every = 16
    assert tel["bytes_sent"] == 0  # one rank: nothing goes on the wire
    torch.manual_seed(0)
    with torch.no_grad():
        before, after = (sum(loss_fn(m(x), y).item() for x, y in loader) for m in (_Net(), model))  # the same init
    assert after < 0.8 * before  # it trained
    theta, weights = local.global_params(), {k: v.clone() for k, v in model.state_dict().items()}
    saved = []

    def step_between(*args, **kwargs):  # the page's ``...`` between the save and the restore: training goes on
        saved.append(sorted(f.name for f in (clean / "ckpt" / "local").iterdir()))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        return restore(*args, **kwargs)

    from lightning_gaussk import local_sgd

    restore = local_sgd.restore_local_sgd
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(local_sgd, "restore_local_sgd", step_between)  # the block imports it from here
        _run_given("checkpointing_local_sgd.py", clean, local=local)
    assert saved == [["local_sgd_manifest_rank0.json", "local_sgd_rank0.pt"]]
    assert torch.equal(local.global_params(), theta)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())  # the save's weights, back


def test_local_sgd_streaming_overlapped_in_one_process(clean):
    # docs/local-sgd.md: 4 fragments, exchanges overlapped with 4 inner steps, on a fresh model and optimizer
    torch.manual_seed(0)
    model = _Net()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with pytest.warns(UserWarning, match="nothing is exchanged"):
        ns = _run_given("local_sgd_streaming.py", clean, SparseLocalSGD=lightning_gaussk.SparseLocalSGD, model=model, opt=opt)
    local = ns["local"]
    assert isinstance(local, lightning_gaussk.SparseLocalSGD)
    for x, y in _loader():
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    tel = local.telemetry
    assert tel["inner_steps"] == 48 and tel["outer_steps"] > 0 and tel["bytes_sent"] == 0


# ------------------------------------------------------------------------------ multi-process snippets (CPU, gloo)
def _floats(pattern: str, text: str) -> list[float]:
    m = re.search(pattern, text)
    assert m, f"{pattern!r} not in output:\n{text[-3000:]}"
    return [float(g.replace(",", "")) for g in m.groups()]


FSDP_LOG = "GaussK: FSDP2 across nodes (custom HSDP), 2 nodes x 2 ranks"


def test_fsdp_raw_script_with_torchrun_on_cpu(tmp_path):
    # docs/fsdp.md: RANKS_PER_NODE=2 torchrun --standalone --nproc-per-node 4 fsdp_raw.py
    save(tmp_path, "fsdp_raw.py")
    (out,) = run_commands("fsdp_raw.sh", tmp_path)
    first, last, sent = _floats(r"2 nodes x 2 ranks on cpu: loss ([\d.]+) -> ([\d.]+), ([\d,]+) bytes sent between nodes", out)
    assert last < 0.6 * first and sent > 0
    assert out.count(FSDP_LOG) == 1  # the hook's setup line, once (rank 0)


def test_fsdp_lightning_as_two_nodes_of_two_devices(tmp_path):
    # docs/fsdp.md: two "node" processes, NODE_RANK=0 and 1, MASTER_PORT replaced by a free port
    save(tmp_path, "fsdp_lightning.py")
    node_of = [env["NODE_RANK"] for env, _ in commands("fsdp_lightning.sh")]
    outs = run_commands("fsdp_lightning.sh", tmp_path, {"MASTER_PORT": str(_free_port())})
    node0, node1 = outs[node_of.index("0")], outs[node_of.index("1")]
    assert FSDP_LOG in node0 and FSDP_LOG not in node1
    first, last, sent = _floats(r"2 nodes x 2 devices, 20 steps: loss ([\d.]+) -> ([\d.]+), ([\d,]+) bytes sent between nodes", node0)
    assert last < first and sent > 0
    assert "GLOBAL_RANK: 2, MEMBER: 3/4" in node1 and "GLOBAL_RANK: 3, MEMBER: 4/4" in node1  # node 1 holds ranks 2, 3
    assert "GLOBAL_RANK: 0, MEMBER: 1/4" in node0 and "nodes x" not in node1  # printed by global rank 0 only


def test_fsdp_accelerate_recipe_with_torchrun_on_cpu(tmp_path):
    pytest.importorskip("accelerate")
    save(tmp_path, "fsdp_accelerate.py")
    (out,) = run_commands("fsdp_accelerate.sh", tmp_path)
    first, last, calls = _floats(r"2 nodes x 2 ranks on cpu: loss ([\d.]+) -> ([\d.]+), (\d+) shard reductions", out)
    assert last < 0.8 * first
    steps = 2048 // 4 // 16 // 2  # samples / ranks / batch / accumulation
    assert calls == steps * 5  # 4 blocks and the root unit, once per optimizer step


def test_accelerate_quickstart_with_torchrun_on_cpu(tmp_path):
    pytest.importorskip("accelerate")
    (tmp_path / "train.py").write_text(snippet("accelerate_quickstart.py").code)
    (out,) = run_commands("accelerate_quickstart.sh", tmp_path)
    for rank in (0, 1):
        calls, sent, dense = _floats(rf"rank {rank}: (\d+) hook calls, ([\d,]+) bytes sent vs dense ([\d,]+)", out)
        assert calls == 1024 // 2 // 16 // 2  # once per optimizer step under accumulate()
        assert 0 < sent < 0.05 * dense
        saved = torch.load(tmp_path / "ckpt" / f"gaussk_state_rank{rank}.pt", weights_only=True)
        assert saved["rank"] == rank and saved["world_size"] == 2


def test_raw_ddp_script_and_checkpoint_block_with_torchrun_on_cpu(tmp_path):
    # the checkpoint block runs where docs/raw_ddp.md puts it: in the script, before state.wait_idle()
    ckpt = snippet("raw_ddp_checkpoint.py")
    assert "before state.wait_idle()" in ckpt.note
    lines = snippet("raw_ddp.py").code.splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.startswith("state.wait_idle()"))
    save(tmp_path, "raw_ddp.py", "".join(lines[:at]) + ckpt.code + "".join(lines[at:]))
    (out,) = run_commands("raw_ddp.sh", tmp_path)
    residuals = []
    for rank in (0, 1):
        calls, sent, dense = _floats(rf"rank {rank}: (\d+) hook calls, ([\d,]+) bytes sent vs dense ([\d,]+)", out)
        assert calls == 20 and 0 < sent < 0.05 * dense
        saved = torch.load(tmp_path / "ckpt" / f"rank{rank}.pt", weights_only=True)
        assert {"model", "optimizer", "gaussk"} <= set(saved)
        residuals.append(saved["gaussk"]["residuals"])
    assert residuals[0].keys() == residuals[1].keys() and residuals[0]
    assert any(r.abs().sum() > 0 for r in residuals[0].values())  # error feedback carried something
    assert any(not torch.equal(residuals[0][n], residuals[1][n]) for n in residuals[0])  # per rank


# ------------------------------------------------------------------------------ LightningCLI yaml in docs/cli.md
CLI_BLOCKS = [b for b in blocks("cli.md") if b.lang == "yaml"]


def test_every_yaml_block_of_cli_md_is_marked_and_every_strategy_has_one():
    assert all(b.kind == "yaml" for b in CLI_BLOCKS), [b.line for b in CLI_BLOCKS if b.kind != "yaml"]
    assert {b.name for b in CLI_BLOCKS} >= {"gaussk_ddp", "gaussk_local", "diloco", "gaussk_fsdp"}
    assert {b.note for b in CLI_BLOCKS} == {"class", "name"}


@pytest.mark.parametrize("block", CLI_BLOCKS, ids=[f"{b.name}-{b.note}-line{b.line}" for b in CLI_BLOCKS])
def test_cli_yaml_block_instantiates_the_strategy_with_its_options(block, clean, monkeypatch):
    pytest.importorskip("jsonargparse")
    import lightning as L
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.strategies import StrategyRegistry

    class Model(L.LightningModule):
        def __init__(self, width: int = 4) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(width, 1)

    monkeypatch.setattr(sys, "argv", ["train.py"])  # not pytest's arguments
    config = yaml.safe_load(block.code)
    trainer_cfg = config["trainer"]
    (clean / "config.yaml").write_text(block.code)
    args = ["--config", "config.yaml"]
    if trainer_cfg.get("accelerator", "auto") in ("gpu", "auto") and torch.cuda.device_count() < trainer_cfg["devices"]:
        args += ["--trainer.accelerator", "cpu"]  # not enough GPUs here: CPU processes, everything else as written
    cli = LightningCLI(Model, run=False, args=args, save_config_callback=None)
    trainer, strategy = cli.trainer, cli.trainer.strategy
    entry = StrategyRegistry[block.name]
    assert type(strategy) is entry["strategy"]
    assert trainer.num_devices == trainer_cfg["devices"] and trainer.num_nodes == trainer_cfg.get("num_nodes", 1)
    if block.note == "name":
        assert trainer_cfg["strategy"] == block.name
        given = entry["init_params"]
    else:
        spec = trainer_cfg["strategy"]
        assert spec["class_path"] == f"lightning_gaussk.{entry['strategy'].__name__}"
        given = spec["init_args"]
    assert given or block.note == "name"
    for key, value in given.items():
        assert effective(strategy, key) == value, key
    defaults = {f.name: f.default for f in dataclasses.fields(_config(strategy))}
    for key, value in defaults.items():
        if key not in given:
            assert effective(strategy, key) == value, key  # the rest: the config's defaults
    for spec in trainer_cfg.get("callbacks", []):
        cls_name = spec["class_path"].rsplit(".", 1)[1]
        (cb,) = [c for c in trainer.callbacks if type(c).__name__ == cls_name]
        assert all(getattr(cb, k) == v for k, v in spec["init_args"].items())
    if "max_steps" in trainer_cfg:
        assert trainer.max_steps == trainer_cfg["max_steps"]
