"""The package's layers: the algorithm imports neither Lightning nor Accelerate, and no module
imports another that imports it back (imports inside functions counted)."""

import ast
import os
import subprocess
import sys
from pathlib import Path


PACKAGE = Path(__file__).resolve().parent.parent / "lightning_gaussk"
# the layers, bottom up: a module of a folder imports only its own folder and the folders before it
LAYERS = ("utils", "selection", "comm", "costs", "config", "engine", "checkpoint", "observe", "frontends")
# the public modules at the package root: they re-export from the layers (and may import any)
PUBLIC = ("lightning_gaussk", "lightning_gaussk.accelerate", "lightning_gaussk.fsdp", "lightning_gaussk.local_sgd", "lightning_gaussk.preflight", "lightning_gaussk.transformers", "lightning_gaussk.fabric")


def _algorithm() -> list[str]:
    """Every module of the layers a raw-torch user runs on (up to the checkpoints), and the root."""
    algo = set(LAYERS[: LAYERS.index("checkpoint") + 1])
    return ["lightning_gaussk", "lightning_gaussk.local_sgd", "lightning_gaussk.fsdp"] + sorted(
        m for m in import_graph() if m.count(".") >= 1 and m.split(".")[1] in algo
    )

_BLOCKED_RUN = r"""
import importlib, importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"lightning", "pytorch_lightning", "lightning_fabric", "accelerate"}:
            raise ModuleNotFoundError(f"blocked: {name}", name=name)
        return None

sys.meta_path.insert(0, Block())
for name in sys.argv[1:]:
    importlib.import_module(name)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in {"lightning", "pytorch_lightning", "lightning_fabric", "accelerate"})
assert not leaked, leaked

# and it trains: one process, gloo, the hook through the core entry
import os, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from lightning_gaussk import GaussKState, gaussk_hook
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[0] if False else os.environ["PORT"])
dist.init_process_group("gloo", rank=0, world_size=1)
ddp = DDP(torch.nn.Linear(8, 4))
state = GaussKState(density=0.25, dense_fallback="never").bind(ddp)
ddp.register_comm_hook(state, gaussk_hook)
ddp(torch.randn(3, 8)).sum().backward()
assert state.telemetry["hook_calls"] == 1 and sum(int(r.count_nonzero()) for r in state.residuals().values()) > 0
try:
    import lightning_gaussk
    lightning_gaussk.GaussKDDPStrategy
except ModuleNotFoundError as err:
    assert "lightning" in str(err), err
else:
    raise AssertionError("GaussKDDPStrategy resolved without lightning")
state.wait_idle()
dist.destroy_process_group()
print("OK")
"""


def test_algorithm_imports_and_trains_with_lightning_and_accelerate_blocked():
    from _dist import free_port

    env = {**os.environ, "PORT": str(free_port())}
    proc = subprocess.run([sys.executable, "-c", _BLOCKED_RUN, *_algorithm()], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package modules it imports, at any depth of its code (functions included)."""
    modules = {_module_name(root, p): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every back edge of a depth-first walk, as the cycle it closes."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_no_import_cycle_in_the_package_counting_imports_inside_functions():
    graph = import_graph()
    assert "lightning_gaussk.engine.state" in graph["lightning_gaussk.engine.pipeline"]  # the graph is real
    assert find_cycles(graph) == []


def test_the_cycle_check_sees_an_import_inside_a_function(tmp_path):
    pkg = tmp_path / "lightning_gaussk"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from lightning_gaussk import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import x\n")
    assert find_cycles(import_graph(pkg)) == [["lightning_gaussk.a", "lightning_gaussk.b", "lightning_gaussk.a"]]


def _layer(module: str) -> int | None:
    """The index of ``module``'s folder in :data:`LAYERS` (None: a public module at the root)."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else None


def layer_violations(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Every import of a folder above the importer's own (imports inside functions counted)."""
    bad = []
    for module, targets in graph.items():
        own = _layer(module)
        if own is None:
            continue
        bad += [(module, t) for t in sorted(targets) if _layer(t) is None or _layer(t) > own]
    return bad


def test_each_folder_imports_only_itself_and_the_folders_below_it():
    graph = import_graph()
    folders = {m.split(".")[1] for m in graph if m.count(".") >= 1 and m not in PUBLIC}
    assert folders == set(LAYERS), folders  # every module lives in a layer or is a public module
    assert "lightning_gaussk.costs.model" in graph["lightning_gaussk.engine.state"]  # the graph is real
    assert layer_violations(graph) == []


def test_the_layer_check_sees_an_upward_import_inside_a_function(tmp_path):
    pkg = tmp_path / "lightning_gaussk"
    for folder in ("comm", "engine"):
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "engine" / "state.py").write_text("from lightning_gaussk.comm import exchange\n")
    (pkg / "comm" / "exchange.py").write_text("def f():\n    from lightning_gaussk.engine import state\n")
    assert layer_violations(import_graph(pkg)) == [("lightning_gaussk.comm.exchange", "lightning_gaussk.engine.state")]
