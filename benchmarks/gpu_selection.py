"""GPU selection benchmark: "gaussk" (Triton and torch paths) against torch.topk and the card's
bandwidth, and the kernel launches and host syncs of one bucket.

For every d and density, on a normal input ``x`` (fp32, on the GPU), it times with CUDA events
(median over ``--repeats`` calls, methods interleaved, after warm-up calls that compile the
kernels):

* ``topk``            ``torch.topk(|x|, k)``, the exact reference;
* ``gaussk``          ``select(x, k, "gaussk")``: torch moments, then the Triton histogram and
                      compaction kernels (what the selector API runs on CUDA);
* ``gaussk_triton``   ``kernels.triton_select(x, k)``: moments, histogram and compaction, all Triton;
* ``gaussk_torch``    ``_histselect.hist_select(x, k)``: the sync-free torch path (no Triton);
* ``accum_fused``     ``kernels.triton_accumulate_select(r, g, u, k)``: the hook's per-bucket
                      work with ``u = g + r`` fused into the first kernel;
* ``accum_unfused``   ``torch.add(r, g, out=u)``, ``select(u, k, "gaussk")`` and ``0 * sum(u)``;

and reports ``ms``, ``topk/m`` (how many times faster than torch.topk), ``m/2reads`` (the time
over that of reading ``x`` twice at the card's measured copy bandwidth: ``2 * 4d / B``, with ``B``
from a device-to-device copy counting read + write bytes) and ``capture`` (squared norm selected
over that of the exact top-k).

Then, for one bucket (``--profile-d`` entries), ``torch.profiler`` counts the kernel launches and
the host synchronisations (``cudaStreamSynchronize``, ``cudaDeviceSynchronize``,
``cudaEventSynchronize``, synchronous ``cudaMemcpy`` and device-to-host copies) of
``select(x, k, "gaussk")``, ``accumulate_select`` and the whole ``gaussk_hook`` (in a process
group of one, NCCL), and checks each under ``torch.cuda.set_sync_debug_mode("error")``.

Usage::

    python benchmarks/gpu_selection.py --json out.json --markdown out.md     # on a CUDA machine
    python benchmarks/gpu_selection.py --device cpu --sizes 20000 --repeats 2  # smoke check, no GPU
                                                                               # (kernels interpreted)

``scripts/gpu_check.sh`` runs it after the ``cuda`` tests and writes
``benchmarks/out/gpu_check.json`` and ``.md``. Exit status 2 when ``--device cuda`` has no CUDA.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
METHODS = ("topk", "gaussk", "gaussk_triton", "gaussk_torch", "accum_fused", "accum_unfused")
LAUNCH_NAMES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cudaLaunchCooperativeKernel")
SYNC_NAMES = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy", "cuMemcpyDtoH")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: smoke check (interpreted kernels)")
    p.add_argument("--sizes", default=None, help="comma-separated d (default 1e6,1e7,2.5e7,1e8; cpu: 20000)")
    p.add_argument("--densities", default="0.01,0.001")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per method (default 15; cpu: 2)")
    p.add_argument("--profile-d", type=float, default=None, help="bucket size for the profiler (default 2.5e7; cpu: 20000)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--markdown", default=None, help="write the markdown tables here")
    p.add_argument("--junit", default=None, help="a pytest --junitxml file: its counts go into the JSON and table")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------ timing
class Timer:
    """Milliseconds of one call: CUDA events on a GPU, the wall clock around a synchronous call on CPU."""

    def __init__(self, device: str) -> None:
        import torch

        self.torch = torch
        self.cuda = device == "cuda"

    def __call__(self, fn: Callable[[], Any]) -> float:
        torch = self.torch
        if not self.cuda:
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)


def copy_bandwidth(device: str, timer: Timer, nbytes: int) -> float:
    """Bytes per second of ``dst.copy_(src)``, counting the read and the write (median of 10)."""
    import torch

    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    ms = statistics.median(timer(lambda: dst.copy_(src)) for _ in range(10))
    return 2 * nbytes / (ms / 1e3)


# ------------------------------------------------------------------------------------ methods
def method_fns(x, r, g, u, k: int) -> dict[str, Callable[[], tuple]]:
    """Each method as a zero-argument call returning ``(values, indices)`` (selection of ``x``,
    or of ``u = g + r`` for the two ``accum_*`` methods)."""
    import torch

    from lightning_gaussk import select
    from lightning_gaussk.selection import triton as kernels
    from lightning_gaussk.selection.histogram import hist_select

    def topk():
        idx = torch.topk(x.abs(), k, sorted=False).indices
        return x[idx], idx

    def unfused():
        torch.add(r, g, out=u)
        values, indices = select(u, k, "gaussk")
        u.sum() * 0.0
        return values, indices

    fns: dict[str, Callable[[], tuple]] = {
        "topk": topk,
        "gaussk": lambda: select(x, k, "gaussk"),
        "gaussk_torch": lambda: hist_select(x, k),
        "accum_unfused": unfused,
    }
    if kernels.triton_available():
        fns["gaussk_triton"] = lambda: kernels.triton_select(x, k)
        fns["accum_fused"] = lambda: kernels.triton_accumulate_select(r, g, u, k)[:2]
    return {m: fns[m] for m in METHODS if m in fns}


def capture(x, values, best_sq: float) -> float:
    return float(values.double().pow(2).sum()) / best_sq if best_sq > 0 else 1.0


def measure(device: str, d: int, density: float, repeats: int, timer: Timer, bw: float) -> list[dict]:
    import torch

    from lightning_gaussk.config import bucket_k

    gen = torch.Generator(device=device).manual_seed(d)
    g = torch.randn(d, device=device, generator=gen)
    r = torch.randn(d, device=device, generator=gen).mul_(0.01)
    x = g + r  # the accum_* methods select this same vector, formed from (r, g) on every call
    u = torch.empty_like(x)
    k = bucket_k(density, d)  # the package's one formula of k
    fns = method_fns(x, r, g, u, k)
    best_sq = float(torch.topk(x.abs(), k, sorted=False).values.double().pow(2).sum())
    quality = {}
    for m, fn in fns.items():  # warm-up: compiles the kernels, fills the caching allocator
        for _ in range(3):
            values, _ = fn()
        quality[m] = capture(x, values, best_sq)
    times: dict[str, list[float]] = {m: [] for m in fns}
    for _ in range(repeats):
        for m, fn in fns.items():
            times[m].append(timer(fn))
    two_reads = 2 * 4 * d / bw * 1e3
    topk_ms = statistics.median(times["topk"])
    rows = []
    for m in fns:
        ms = statistics.median(times[m])
        rows.append({
            "d": d, "density": density, "k": k, "method": m, "ms": ms, "topk_over_m": topk_ms / ms,
            "m_over_two_reads": ms / two_reads, "two_reads_ms": two_reads, "capture": quality[m],
        })
    del x, r, g, u
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------ profiling
class _Bucket:
    """The four methods of ``dist.GradBucket`` that gaussk_hook calls."""

    def __init__(self, buf) -> None:
        self.buf = buf
        self.params = [buf]

    def buffer(self):
        return self.buf

    def index(self) -> int:
        return 0

    def parameters(self):
        return self.params

    def is_last(self) -> bool:
        return True


def count_events(prof) -> dict[str, int]:
    """Kernel launches, kernels run, host syncs and device-to-host copies seen by the profiler."""
    launches = kernels = syncs = dtoh = 0
    for e in prof.events():
        name = e.name
        on_device = str(getattr(e, "device_type", "")).endswith("CUDA")
        if on_device:
            if "Memcpy DtoH" in name:
                dtoh += 1
            elif not name.startswith(("Memcpy", "Memset")):
                kernels += 1
        elif name in LAUNCH_NAMES:
            launches += 1
        elif name in SYNC_NAMES:
            syncs += 1
    return {"launches": launches, "kernels": kernels, "syncs": syncs, "dtoh_copies": dtoh}


def profile_bucket(device: str, d: int, density: float) -> list[dict]:
    """Per call on one ``d``-entry fp32 bucket: profiler counts and the sync-debug verdict."""
    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from lightning_gaussk import GaussKState, accumulate_select, gaussk_hook, select
    from lightning_gaussk.config import bucket_k

    if not dist.is_initialized():
        sock = __import__("socket").socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        dist.init_process_group(
            "nccl" if device == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1
        )
    k = bucket_k(density, d)  # the package's one formula of k
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(d, device=device, generator=gen)
    r = torch.randn(d, device=device, generator=gen).mul_(0.01)
    out = torch.empty_like(x)
    state = GaussKState(density=density, dense_fallback="never")
    bucket = _Bucket(torch.empty_like(x))

    bucket.buf.copy_(x)  # later calls run on the previous call's decoded result: a valid gradient too
    calls = {
        "select gaussk": lambda: select(x, k, "gaussk"),
        "accumulate_select (fused on CUDA)": lambda: accumulate_select(r, x, out, k, "gaussk"),
        "gaussk_hook, one bucket": lambda: gaussk_hook(state, bucket).wait(),
    }
    rows = []
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    for name, fn in calls.items():
        for _ in range(3):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
        counts = count_events(prof)
        counts["syncs"] = max(0, counts["syncs"] - (1 if device == "cuda" else 0))  # our synchronize()
        verdict = "n/a (CPU)"
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                fn()
                verdict = "yes"
            except RuntimeError as e:
                verdict = f"no: {str(e).splitlines()[0][:120]}"
            finally:
                torch.cuda.set_sync_debug_mode(0)
        rows.append({"call": name, "d": d, "k": k, **counts, "sync_free": verdict})
    state.wait_idle()
    dist.destroy_process_group()
    return rows


# ------------------------------------------------------------------------------------ report
def junit_counts(path: str | None) -> dict[str, Any] | None:
    if not path or not os.path.exists(path):
        return None
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    total["passed"] = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    failed = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname')}::{case.get('name')}")
    total["failed_tests"] = failed
    return total


def machine(device: str, bw: float) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "device": device, "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "copy_bandwidth_GBps": bw / 1e9, "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_count"] = torch.cuda.device_count()
    return info


def fmt_d(d: int) -> str:
    return f"{d / 1e6:g}M" if d >= 10**6 else str(d)


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = ["# GPU check", ""]
    where = m.get("gpu", "CPU (smoke check: interpreted kernels, figures mean nothing)")
    lines.append(
        f"Machine: {where}; torch {m['torch']} (CUDA {m['cuda']}), triton {m['triton']}, Python {m['python']}; "
        f"measured copy bandwidth {m['copy_bandwidth_GBps']:.0f} GB/s (read + write bytes of a device-to-device copy)."
    )
    lines.append("")
    tests = result.get("tests")
    if tests:
        lines += [
            "## cuda tests", "",
            "| passed | failed | errors | skipped |", "|---|---|---|---|",
            f"| {tests['passed']} | {tests['failures']} | {tests['errors']} | {tests['skipped']} |", "",
        ]
        lines += [f"- FAILED `{t}`" for t in tests["failed_tests"]] + ([""] if tests["failed_tests"] else [])
    lines += [
        "## Selection", "",
        "`topk/m`: torch.topk time over the method's; `m/2reads`: the method's time over reading x twice "
        "at the measured copy bandwidth (target: at most 3); `capture`: squared norm selected over the exact top-k's.",
        "",
        "| d | density | method | ms | topk/m | m/2reads | capture |", "|---|---|---|---|---|---|---|",
    ]
    for row in result["selection"]:
        lines.append(
            f"| {fmt_d(row['d'])} | {row['density']} | {row['method']} | {row['ms']:.3f} | {row['topk_over_m']:.1f} | "
            f"{row['m_over_two_reads']:.2f} | {row['capture']:.4f} |"
        )
    lines += [
        "", "## One bucket: launches and host syncs", "",
        "| call | d | k | kernel launches | kernels run | host syncs | DtoH copies | sync-free under sync_debug_mode |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["profile"]:
        lines.append(
            f"| {row['call']} | {fmt_d(row['d'])} | {row['k']} | {row['launches']} | {row['kernels']} | {row['syncs']} | "
            f"{row['dtoh_copies']} | {row['sync_free']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    sys.path.insert(0, ROOT)
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        print(
            f"gpu_selection.py: needs CUDA, but torch {torch.__version__} (CUDA build: {torch.version.cuda}) sees no "
            "CUDA device (torch.cuda.is_available() is False). Run it on a machine with an NVIDIA GPU and a CUDA "
            "build of torch, or pass --device cpu for a smoke check.",
            file=sys.stderr,
        )
        return 2
    cpu = a.device == "cpu"
    sizes = [int(float(s)) for s in (a.sizes or ("20000" if cpu else "1e6,1e7,2.5e7,1e8")).split(",")]
    densities = [float(s) for s in a.densities.split(",")]
    repeats = a.repeats or (2 if cpu else 15)
    profile_d = int(a.profile_d or (20_000 if cpu else 25_000_000))
    timer = Timer(a.device)
    bw = copy_bandwidth(a.device, timer, (1 << 22) if cpu else (1 << 30))
    started = time.time()
    rows = []
    for d in sizes:
        for density in densities:
            rows += measure(a.device, d, density, repeats, timer, bw)
            best = {r["method"]: r for r in rows[-len(METHODS):] if r["d"] == d and r["density"] == density}
            print(
                f"d={fmt_d(d)} density={density}: " + ", ".join(f"{m} {r['ms']:.3f} ms" for m, r in best.items()),
                file=sys.stderr,
            )
    prof_rows = []
    for density in densities:
        prof_rows += profile_bucket(a.device, profile_d, density)
    result = {
        "command": " ".join([os.path.basename(sys.argv[0])] + (argv if argv is not None else sys.argv[1:])),
        "machine": machine(a.device, bw),
        "tests": junit_counts(a.junit),
        "selection": rows,
        "profile": prof_rows,
        "seconds": time.time() - started,
    }
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    text = markdown(result)
    if a.markdown:
        os.makedirs(os.path.dirname(os.path.abspath(a.markdown)), exist_ok=True)
        with open(a.markdown, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
