"""What the benchmark scripts share: a free port, the one timing loop, DDP's bucket assignment, the
machine line of their reports, and the marked sections of docs/benchmarks.md that each script
rewrites. Standard library only (the cluster
harness and its CI tests import it without torch).
"""

import os
import platform
import socket
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCHMARKS)  # the repository
DOCS = os.path.join(ROOT, "docs", "benchmarks.md")  # the report every script writes a section of
IMG = os.path.join(ROOT, "docs", "img")  # its figures
OUT = os.path.join(BENCHMARKS, "out")  # raw results (JSON)

# The sections of docs/benchmarks.md, in document order; each lies between
# ``<!-- name:begin -->`` and ``<!-- name:end -->`` and belongs to one script.
DOC_SECTIONS = ("selection", "throughput", "time_to_accuracy", "costmodel", "scaleout", "exchange", "bounded_exchange", "fsdp")


def free_port() -> int:
    """A free TCP port on loopback (for ``MASTER_PORT`` of processes on this machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo_worker(timeout_minutes: float) -> tuple[int, int, str]:
    """A worker on the emulated cluster starts here: one thread, the gloo group of the launcher's
    ``RANK`` / ``WORLD_SIZE``; returns ``(rank, world, interface of its host)``."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(minutes=timeout_minutes))
    return rank, world, os.environ["GK_IFNAME"]


def median_time(fn: Callable[[], Any], reps: int, warm: int = 1) -> float:
    """The one timing loop of the benchmarks: ``warm`` untimed calls, then the median wall-clock
    seconds of ``reps`` calls (``time.perf_counter``; the caller synchronises a device in ``fn``)."""
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def ddp_bucket_groups(numels: Sequence[int], first_bucket_bytes: int | None = None, cap_bytes: int = 25 * 2**20) -> list[list[int]]:
    """DDP's buckets after its rebuild: :func:`lightning_gaussk.observe.preflight.ddp_bucket_groups` (the
    one copy; the pre-flight command prices the same buckets)."""
    from lightning_gaussk.observe.preflight import ddp_bucket_groups as groups

    return groups(numels, first_bucket_bytes, cap_bytes)


def load_average() -> float:
    """The 1-minute load average (NaN where the platform has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def machine_description(*details: str) -> str:
    """``"<CPU model>, <n> logical CPUs, <details>, Python <version>"`` for the benchmark reports."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return ", ".join([cpu, f"{os.cpu_count()} logical CPUs", *details, f"Python {platform.python_version()}"])


def replace_section(doc: str, name: str, body: str) -> str:
    """``doc`` with the text between ``<!-- name:begin -->`` and ``<!-- name:end -->`` replaced by
    ``body``; a missing section is inserted after the closest earlier section of
    :data:`DOC_SECTIONS` that is present (else at the end). Other text is left as it is."""
    if name not in DOC_SECTIONS:
        raise ValueError(f"section must be one of {DOC_SECTIONS}, got {name!r}")
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{body.strip()}\n{end}"
    if begin in doc and end in doc and doc.index(begin) < doc.index(end):
        return doc[: doc.index(begin)] + block + doc[doc.index(end) + len(end) :]
    pos = len(doc)
    for prev in reversed(DOC_SECTIONS[: DOC_SECTIONS.index(name)]):
        marker = f"<!-- {prev}:end -->"
        if marker in doc:
            pos = doc.index(marker) + len(marker)
            break
    head, tail = doc[:pos].rstrip("\n"), doc[pos:].lstrip("\n")
    return head + "\n\n" + block + "\n" + ("\n" + tail if tail else "")


def write_doc_section(path: str, name: str, body: str) -> None:
    """Rewrite section ``name`` of the Markdown file ``path`` (created with a title if missing)."""
    doc = ""
    if os.path.exists(path):
        with open(path) as f:
            doc = f.read()
    doc = doc or "# Benchmarks\n"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(replace_section(doc, name, body))
