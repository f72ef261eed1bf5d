"""The package's layers: the algorithm imports neither Lightning nor Accelerate, and no module
imports another that imports it back (imports inside functions counted)."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lightning_gaussk"
# the algorithm: everything a raw-torch user, Accelerate or a future FSDP2/local-SGD driver runs on
ALGORITHM = [
    "lightning_gaussk",
    "lightning_gaussk.core.codec",
    "lightning_gaussk.core.exchange",
    "lightning_gaussk.core.store",
    "lightning_gaussk.core.topology",
    "lightning_gaussk.core.state",
    "lightning_gaussk.core.pipeline",
    "lightning_gaussk.core.log",
    "lightning_gaussk.core.linkprobe",
    "lightning_gaussk.core.timing",
    "lightning_gaussk.core.sparse_allreduce",
    "lightning_gaussk.hook",
    "lightning_gaussk.node_mode",
    "lightning_gaussk.config",
    "lightning_gaussk.costmodel",
    "lightning_gaussk.selectors",
    "lightning_gaussk.topology",
    "lightning_gaussk.checkpoint",
]

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
    proc = subprocess.run([sys.executable, "-c", _BLOCKED_RUN, *ALGORITHM], capture_output=True, text=True, env=env, timeout=120)
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
    assert "lightning_gaussk.core.store" in graph["lightning_gaussk.core.pipeline"]  # the graph is real
    assert find_cycles(graph) == []


def test_the_cycle_check_sees_an_import_inside_a_function(tmp_path):
    pkg = tmp_path / "lightning_gaussk"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from lightning_gaussk import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import x\n")
    assert find_cycles(import_graph(pkg)) == [["lightning_gaussk.a", "lightning_gaussk.b", "lightning_gaussk.a"]]
