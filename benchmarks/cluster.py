"""An emulated cluster on one Linux machine: W hosts as network namespaces, real links between them.

Each rank runs in its own network namespace ("host") with one interface and a private address
(10.77.0.1, 10.77.0.2, ...). Two hosts are joined by one veth pair; more hosts each get a veth
pair into a Linux bridge that lives in a namespace of its own (the "switch"). Every link is
shaped in both directions with ``tc`` (token bucket ``tbf`` at the chosen rate, optionally under
a ``netem`` delay), so a host sends and receives at most ``rate`` at once, like a full-duplex
Ethernet port. Nothing is created in the machine's own namespace: the veth ends are created
directly inside the run's namespaces, and deleting the namespaces deletes every link and the
bridge with them.

gloo runs across the hosts: ``MASTER_ADDR`` is host 0's address, ``GLOO_SOCKET_IFNAME`` each
host's interface. Every rank is started as ``ip netns exec NS python ...`` with one torch thread
(``OMP_NUM_THREADS=1``; the rank scripts also call ``torch.set_num_threads(1)``).

Needs root (``ip netns`` / ``tc``); without it the command says so and exits with status 2.
Cleanup always runs: ``try/finally`` plus SIGINT/SIGTERM/SIGHUP handlers that turn the signal into
an exception; rank processes (started in their own sessions) are killed by process group, then
the namespaces are deleted and their absence checked. Names are unique per run
(``gkb-<pid>-<random>-h<i>``); ``--cleanup-stale`` removes namespaces of dead runs.

Usage::

    python benchmarks/cluster.py --world 2 --rate 1gbit --netcheck          # measure the links
    python benchmarks/cluster.py --world 4 --rate 10gbit --delay-ms 0.1 -- script.py ARGS
    python benchmarks/cluster.py --world 2 --rate 1gbit --dry-run -- script.py   # print commands
    python benchmarks/cluster.py --cleanup-stale

The module imports nothing beyond the standard library (the CI smoke tests import it without
root and without torch).
"""

import argparse
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import _common
from _common import DOC_SECTIONS

PREFIX = "gkb"
SUBNET = "10.77.0"  # private; only ever configured inside the run's own namespaces
MASTER_PORT = 29500  # a fresh namespace has every port free
MAX_WORLD = 64
_RATE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit)$")
_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}
_NS = re.compile(rf"^{PREFIX}-(\d+)-([0-9a-f]+)-(h\d+|sw)$")

Runner = Callable[[Sequence[str]], None]


class ClusterError(RuntimeError):
    """Setting up, running or tearing down the emulated cluster failed."""


class ClusterInterrupted(BaseException):
    """Raised from a signal handler (SIGINT/SIGTERM/SIGHUP) so that every ``finally`` runs."""


# ---------------------------------------------------------------------------------- specification
def parse_rate(rate: str) -> int:
    """``"1gbit"`` -> 1_000_000_000 bits/s (tc's units: bit, kbit, mbit, gbit; decimal)."""
    if not isinstance(rate, str):
        raise TypeError(f"rate must be a string like '1gbit', got {rate!r}")
    m = _RATE.match(rate.strip().lower())
    if not m:
        raise ValueError(f"rate must look like '100mbit', '1gbit' or '10gbit', got {rate!r}")
    bps = int(float(m.group(1)) * _UNITS[m.group(2)])
    if not (10**6 <= bps <= 400 * 10**9):
        raise ValueError(f"rate must be between 1mbit and 400gbit, got {rate!r}")
    return bps


@dataclass(frozen=True)
class LinkSpec:
    """One host's port: ``rate`` each way, plus an optional one-way ``delay_ms`` (netem)."""

    rate: str = "1gbit"
    delay_ms: float = 0.0

    def __post_init__(self) -> None:
        parse_rate(self.rate)
        if isinstance(self.delay_ms, bool) or not isinstance(self.delay_ms, (int, float)):
            raise TypeError(f"delay_ms must be a number, got {self.delay_ms!r}")
        if not (0.0 <= self.delay_ms <= 1000.0):
            raise ValueError(f"delay_ms must be in [0, 1000], got {self.delay_ms!r}")

    @property
    def bits_per_second(self) -> int:
        return parse_rate(self.rate)

    @property
    def burst_bytes(self) -> int:
        """tbf bucket: 2 ms at the rate, at least 256 KiB (the recipe checked at 1 Gbit/s)."""
        return max(256 * 1024, self.bits_per_second // 8 // 500)

    @property
    def limit_bytes(self) -> int:
        """tbf queue: 50 ms at the rate, at least 1 MiB (a queue, not a loss generator)."""
        return max(1 << 20, self.bits_per_second // 8 // 20)


def new_run_id() -> str:
    """``<pid>-<4 random hex>``: unique per run; the pid lets ``--cleanup-stale`` spot dead runs."""
    return f"{os.getpid()}-{secrets.token_hex(2)}"


@dataclass(frozen=True)
class ClusterSpec:
    """``world`` hosts joined by ``link``s; every name and address is derived from ``run_id``.

    ``ranks_per_host`` (``L``, default 1) ranks share each host ("node"): ``ranks = world * L``
    ranks, node-contiguous (rank ``r`` is local rank ``r % L`` of host ``r // L``), as
    Lightning, torchrun and Accelerate number them. Ranks of one host share its address, so
    traffic between them stays on that namespace's loopback (the kernel routes a local address
    through ``lo``): only inter-host traffic crosses the shaped veth."""

    world: int
    link: LinkSpec = field(default_factory=LinkSpec)
    run_id: str = field(default_factory=new_run_id)
    ranks_per_host: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.world, bool) or not isinstance(self.world, int):
            raise TypeError(f"world must be an int, got {self.world!r}")
        if not (2 <= self.world <= MAX_WORLD):
            raise ValueError(f"world must be in [2, {MAX_WORLD}] (one namespace per rank), got {self.world}")
        if not re.fullmatch(r"\d+-[0-9a-f]+", self.run_id):
            raise ValueError(f"run_id must look like '<pid>-<hex>', got {self.run_id!r}")
        if isinstance(self.ranks_per_host, bool) or not isinstance(self.ranks_per_host, int) or not (1 <= self.ranks_per_host <= 64):
            raise ValueError(f"ranks_per_host must be an int in [1, 64], got {self.ranks_per_host!r}")

    @property
    def ranks(self) -> int:
        """Ranks in all: ``world * ranks_per_host``."""
        return self.world * self.ranks_per_host

    def host_of(self, rank: int) -> int:
        """The host (namespace index) of global rank ``rank`` (node-contiguous)."""
        if isinstance(rank, bool) or not isinstance(rank, int) or not (0 <= rank < self.ranks):
            raise ValueError(f"rank must be in [0, {self.ranks}), got {rank!r}")
        return rank // self.ranks_per_host

    # names: namespaces may be long, interface names must stay within 15 characters
    @property
    def _short(self) -> str:
        pid, rnd = self.run_id.split("-")
        return f"{int(pid):x}{rnd}"[-8:]

    def ns(self, rank: int) -> str:
        self._check_rank(rank)
        return f"{PREFIX}-{self.run_id}-h{rank}"

    @property
    def switch_ns(self) -> str | None:
        return f"{PREFIX}-{self.run_id}-sw" if self.world > 2 else None

    def namespaces(self) -> list[str]:
        return [self.ns(r) for r in range(self.world)] + ([self.switch_ns] if self.switch_ns else [])

    def ifname(self, rank: int) -> str:
        """The host's own interface (inside its namespace)."""
        self._check_rank(rank)
        return f"gk{self._short}h{rank}"

    def port_ifname(self, rank: int) -> str:
        """The switch side of host ``rank``'s veth pair (W > 2 only)."""
        self._check_rank(rank)
        return f"gk{self._short}p{rank}"

    @property
    def bridge(self) -> str:
        return f"gk{self._short}br"

    def address(self, rank: int) -> str:
        self._check_rank(rank)
        return f"{SUBNET}.{rank + 1}"

    @property
    def master_addr(self) -> str:
        return self.address(0)

    def _check_rank(self, rank: int) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or not (0 <= rank < self.world):
            raise ValueError(f"rank must be in [0, {self.world}), got {rank!r}")


# ---------------------------------------------------------------------------------- commands
def qdisc_commands(ns: str, dev: str, link: LinkSpec) -> list[list[str]]:
    """Shape ``dev``'s egress: ``tbf`` at the rate, under ``netem delay`` when a delay is asked."""
    tbf = ["tbf", "rate", link.rate, "burst", str(link.burst_bytes), "limit", str(link.limit_bytes)]
    if link.delay_ms > 0:
        return [
            ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "handle", "1:",
             "netem", "delay", f"{link.delay_ms}ms", "limit", "100000"],
            ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "parent", "1:", "handle", "10:", *tbf],
        ]  # fmt: skip
    return [["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", *tbf]]


def setup_commands(spec: ClusterSpec) -> list[list[str]]:
    """Every command that builds the cluster, in order (namespaces first: see :class:`EmulatedCluster`)."""
    cmds: list[list[str]] = [["ip", "netns", "add", ns] for ns in spec.namespaces()]
    for r in range(spec.world):
        cmds.append(["ip", "-n", spec.ns(r), "link", "set", "lo", "up"])
    shaped: list[tuple[str, str]] = []  # (namespace, device) whose egress is shaped
    if spec.world == 2:
        cmds.append(["ip", "link", "add", spec.ifname(0), "netns", spec.ns(0), "type", "veth",
                     "peer", "name", spec.ifname(1), "netns", spec.ns(1)])  # fmt: skip
    else:
        sw = spec.switch_ns
        assert sw is not None
        cmds += [
            ["ip", "-n", sw, "link", "add", spec.bridge, "type", "bridge"],
            ["ip", "-n", sw, "link", "set", spec.bridge, "up"],
        ]
        for r in range(spec.world):
            cmds += [
                ["ip", "link", "add", spec.ifname(r), "netns", spec.ns(r), "type", "veth",
                 "peer", "name", spec.port_ifname(r), "netns", sw],
                ["ip", "-n", sw, "link", "set", spec.port_ifname(r), "master", spec.bridge],
                ["ip", "-n", sw, "link", "set", spec.port_ifname(r), "up"],
            ]  # fmt: skip
            shaped.append((sw, spec.port_ifname(r)))  # traffic towards host r
    for r in range(spec.world):
        cmds += [
            ["ip", "-n", spec.ns(r), "addr", "add", f"{spec.address(r)}/24", "dev", spec.ifname(r)],
            ["ip", "-n", spec.ns(r), "link", "set", spec.ifname(r), "up"],
        ]
        shaped.append((spec.ns(r), spec.ifname(r)))  # traffic from host r
    for ns, dev in shaped:
        cmds += qdisc_commands(ns, dev, spec.link)
    return cmds


def teardown_commands(namespaces: Sequence[str]) -> list[list[str]]:
    """Delete hosts, then the switch; a veth pair and the bridge go with their namespaces."""
    return [["ip", "netns", "del", ns] for ns in reversed(list(namespaces))]


_LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK")


def _host_vars(spec: ClusterSpec, host: int) -> dict[str, str]:
    return dict(
        MASTER_ADDR=spec.master_addr,
        MASTER_PORT=str(MASTER_PORT),
        GLOO_SOCKET_IFNAME=spec.ifname(host),
        GK_IFNAME=spec.ifname(host),
        GK_LINK_RATE=spec.link.rate,
        GK_LINK_DELAY_MS=str(spec.link.delay_ms),
        GK_RANKS_PER_HOST=str(spec.ranks_per_host),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )


def rank_env(spec: ClusterSpec, rank: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of global rank ``rank`` (on host ``spec.host_of(rank)``): torch.distributed
    rendezvous on host 0, one thread; with several ranks per host also torchrun's
    ``LOCAL_WORLD_SIZE`` and ``GROUP_RANK``."""
    host = spec.host_of(rank)
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in _LAUNCHER_VARS}
    env.update(RANK=str(rank), LOCAL_RANK=str(rank % spec.ranks_per_host), WORLD_SIZE=str(spec.ranks), **_host_vars(spec, host))
    if spec.ranks_per_host > 1:
        env.update(LOCAL_WORLD_SIZE=str(spec.ranks_per_host), GROUP_RANK=str(host))
    return env


def node_env(spec: ClusterSpec, host: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of ONE launcher process on host ``host`` that starts the host's
    ``ranks_per_host`` ranks itself (Lightning's popen launcher with ``num_nodes = world``):
    ``MASTER_ADDR`` / ``MASTER_PORT`` / ``NODE_RANK`` as a multi-node job sets them, and no
    ``RANK`` / ``LOCAL_RANK`` / ``WORLD_SIZE`` (with ``LOCAL_RANK`` set, Lightning would take the
    process for one a launcher had already started)."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in _LAUNCHER_VARS}
    env.update(NODE_RANK=str(host), **_host_vars(spec, host))
    return env


def rank_command(spec: ClusterSpec, rank: int, argv: Sequence[str], python: str | None = None) -> list[str]:
    """``ip netns exec <host of rank> <python> <argv...>`` (the environment comes from :func:`rank_env`)."""
    if not argv:
        raise ValueError("argv must name the script to run in every rank")
    return ["ip", "netns", "exec", spec.ns(spec.host_of(rank)), python or sys.executable, *argv]


# ---------------------------------------------------------------------------------- privileges
def missing_privileges() -> str | None:
    """Why this process cannot build namespaces (None when it can)."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "network namespaces and tc need root (run as root, e.g. with sudo)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found (install iproute2)"
    return None


def require_root() -> None:
    """Exit with status 2 and a clear message when the harness cannot run here."""
    why = missing_privileges()
    if why:
        print(f"emulated cluster: cannot run: {why}.", file=sys.stderr)
        sys.exit(2)


def _run(cmd: Sequence[str]) -> None:
    res = subprocess.run(list(cmd), capture_output=True, text=True)
    if res.returncode != 0:
        raise ClusterError(f"`{' '.join(cmd)}` failed ({res.returncode}): {res.stderr.strip()}")


def list_namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


# ---------------------------------------------------------------------------------- the cluster
@dataclass
class RankProcess:
    rank: int
    cmd: list[str]
    log: str
    proc: subprocess.Popen[bytes] | None = None


class EmulatedCluster:
    """Context manager: build the namespaces and links, run ranks in them, always tear down.

    ``runner`` executes one command (default: ``subprocess.run``, raising on failure); tests pass
    a recorder. Bookkeeping: a namespace is recorded as soon as ``ip netns add`` succeeds, so a
    failure half-way through setup deletes exactly what was created.
    """

    def __init__(self, spec: ClusterSpec, runner: Runner | None = None, log_dir: str | None = None) -> None:
        self.spec = spec
        self.runner = runner or _run
        self.created: list[str] = []  # namespaces that exist, in creation order
        self.procs: list[RankProcess] = []
        self.log_dir = log_dir
        self._own_log_dir = log_dir is None
        self._old_handlers: dict[int, Any] = {}
        self.torn_down = False

    # -- lifecycle
    def __enter__(self) -> "EmulatedCluster":
        self._install_signal_handlers()
        try:
            self.setup()
        except BaseException:
            self.teardown()
            self._restore_signal_handlers()
            raise
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            self.teardown()
        finally:
            self._restore_signal_handlers()
        if exc_type is None and self._own_log_dir and self.log_dir:  # keep the logs of a failed run
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def setup(self) -> None:
        if self.log_dir is None:
            self.log_dir = tempfile.mkdtemp(prefix=f"{PREFIX}-{self.spec.run_id}-")
        os.makedirs(self.log_dir, exist_ok=True)
        for cmd in setup_commands(self.spec):
            try:
                self.runner(cmd)
            except ClusterError as e:
                if "netem" in cmd:
                    raise ClusterError(f"{e}\n(this kernel has no netem qdisc: run without --delay-ms)") from e
                raise
            if cmd[:3] == ["ip", "netns", "add"]:
                self.created.append(cmd[3])

    def teardown(self) -> list[str]:
        """Kill our rank processes, delete our namespaces; returns what could not be deleted."""
        self._kill_ranks()
        left: list[str] = []
        for cmd in teardown_commands(self.created):
            ns = cmd[3]
            self._kill_in_namespace(ns)
            try:
                self.runner(cmd)
            except Exception as e:  # keep going: delete everything else
                left.append(ns)
                print(f"emulated cluster: cleanup of {ns} failed: {e}", file=sys.stderr)
        self.created = [ns for ns in self.created if ns in left]
        if self.runner is _run:  # a real run: check that nothing of ours is left
            still = [ns for ns in list_namespaces() if ns.startswith(f"{PREFIX}-{self.spec.run_id}-")]
            for ns in still:
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            left = sorted(set(left) | {ns for ns in still if ns in list_namespaces()})
        self.torn_down = True
        if left:
            print(f"emulated cluster: LEFT BEHIND {left}; delete with `ip netns del NAME`", file=sys.stderr)
        return left

    # -- signals
    def _install_signal_handlers(self) -> None:
        def handler(signum: int, frame: FrameType | None) -> None:
            raise ClusterInterrupted(f"signal {signal.Signals(signum).name}")

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            try:
                self._old_handlers[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread: rely on try/finally only
                pass

    def _restore_signal_handlers(self) -> None:
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        self._old_handlers = {}

    # -- ranks
    def launch(self, argv: Sequence[str], env: dict[str, str] | None = None, python: str | None = None,
               per_host: bool = False) -> list[RankProcess]:  # fmt: skip
        """Start ``python argv...`` for every rank (rank r in host ``spec.host_of(r)``, with
        :func:`rank_env`); with ``per_host`` once per host instead (:func:`node_env`: the script
        launches the host's ranks itself, as Lightning's popen launcher does). Returns at once;
        the logs are ``rank{r}.log`` (``host{h}.log`` with ``per_host``)."""
        assert self.log_dir is not None, "launch() inside `with EmulatedCluster(...)`"
        procs = []
        n = self.spec.world if per_host else self.spec.ranks
        for r in range(n):
            if per_host:
                cmd = ["ip", "netns", "exec", self.spec.ns(r), python or sys.executable, *argv]
                if not argv:
                    raise ValueError("argv must name the script to run on every host")
                penv, log_name = node_env(self.spec, r, env), f"host{r}.log"
            else:
                cmd, penv, log_name = rank_command(self.spec, r, argv, python), rank_env(self.spec, r, env), f"rank{r}.log"
            rp = RankProcess(r, cmd, os.path.join(self.log_dir, log_name))
            with open(rp.log, "wb") as log:
                rp.proc = subprocess.Popen(rp.cmd, env=penv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            procs.append(rp)
        self.procs += procs
        return procs

    def run(self, argv: Sequence[str], env: dict[str, str] | None = None, timeout: float = 600.0,
            python: str | None = None, per_host: bool = False) -> list[int]:  # fmt: skip
        """Run ``argv`` on every rank (or host, see :meth:`launch`) and wait; raise
        :class:`ClusterError` with the logs' tails when one fails or ``timeout`` seconds pass
        (the others are then killed)."""
        procs = self.launch(argv, env, python, per_host)
        deadline = time.monotonic() + timeout
        try:
            while True:
                codes = [p.proc.poll() for p in procs if p.proc is not None]
                if any(c not in (None, 0) for c in codes) or all(c == 0 for c in codes):
                    break
                if time.monotonic() > deadline:
                    raise ClusterError(f"ranks still running after {timeout:.0f} s\n" + self.tails(procs))
                time.sleep(0.2)
            if any(c != 0 for c in codes):
                time.sleep(1.0)  # let the others print their side of it
                raise ClusterError("a rank failed\n" + self.tails(procs))
            return [int(c) for c in codes if c is not None]
        finally:
            self._kill_ranks(procs)

    @staticmethod
    def tails(procs: Sequence[RankProcess], n: int = 3000) -> str:
        out = []
        for p in procs:
            code = p.proc.poll() if p.proc is not None else None
            try:
                with open(p.log, "rb") as f:
                    text = f.read().decode(errors="replace")[-n:]
            except OSError:
                text = "(no log)"
            out.append(f"--- rank {p.rank} (exit {code}) {p.log}\n{text}")
        return "\n".join(out)

    def _kill_ranks(self, procs: Sequence[RankProcess] | None = None) -> None:
        procs = self.procs if procs is None else procs
        live = [p.proc for p in procs if p.proc is not None and p.proc.poll() is None]
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            for proc in live:
                try:
                    os.killpg(proc.pid, sig)  # the rank's own session: only what we started
                except ProcessLookupError:
                    pass
            end = time.monotonic() + wait
            while time.monotonic() < end and any(p.poll() is None for p in live):
                time.sleep(0.05)
            live = [p for p in live if p.poll() is None]
            if not live:
                break

    def _kill_in_namespace(self, ns: str) -> None:
        """Processes still inside one of OUR namespaces (started by us) would keep it alive."""
        if self.runner is not _run:
            return
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
        for pid in out:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass


def stale_namespaces(names: Sequence[str], alive: Callable[[int], bool]) -> list[str]:
    """Namespaces of this harness whose creating process is gone (``gkb-<pid>-<hex>-...``)."""
    out = []
    for ns in names:
        m = _NS.match(ns)
        if m and not alive(int(m.group(1))):
            out.append(ns)
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale() -> list[str]:
    """Delete the namespaces of dead runs of this harness, killing what still runs inside them
    (rank processes a killed run left behind)."""
    stale = stale_namespaces(list_namespaces(), _pid_alive)
    for cmd in teardown_commands(sorted(stale)):
        for pid in subprocess.run(["ip", "netns", "pids", cmd[3]], capture_output=True, text=True).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(cmd, capture_output=True)
    return stale


# ---------------------------------------------------------------------------------- link check
def netcheck_worker(nbytes: int, out: str | None) -> None:
    """Inside a rank: rank 1 streams ``nbytes`` to rank 0 and back over TCP; rank 0 times it."""
    rank, addr = int(os.environ["RANK"]), os.environ["MASTER_ADDR"]
    port = MASTER_PORT + 1
    chunk = b"\0" * (1 << 20)

    def pump(sock: socket.socket, send: bool) -> float:
        t0, done = time.perf_counter(), 0
        while done < nbytes:
            if send:
                sock.sendall(chunk[: min(len(chunk), nbytes - done)])
                done += min(len(chunk), nbytes - done)
            else:
                got = sock.recv(1 << 20)
                if not got:
                    raise ClusterError("peer closed early")
                done += len(got)
        return time.perf_counter() - t0

    if rank == 0:
        with socket.create_server((addr, port)) as srv:
            conn, _ = srv.accept()
            with conn:
                t_rtt = time.perf_counter()
                conn.sendall(b"p")
                conn.recv(1)
                rtt = time.perf_counter() - t_rtt
                down = pump(conn, send=False)
                conn.sendall(b"k")
                up = pump(conn, send=True)
                conn.recv(1)
        res = {"bytes": nbytes, "rtt_ms": rtt * 1e3, "gbit_in": nbytes * 8 / down / 1e9, "gbit_out": nbytes * 8 / up / 1e9}
        print(json.dumps(res))
        if out:
            with open(out, "w") as f:
                json.dump(res, f)
    elif rank == 1:
        for _ in range(200):
            try:
                sock = socket.create_connection((addr, port), timeout=30)
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise ClusterError("cannot reach rank 0")
        with sock:
            sock.recv(1)
            sock.sendall(b"p")
            pump(sock, send=True)
            sock.recv(1)
            pump(sock, send=False)
            sock.sendall(b"k")


# ---------------------------------------------------------------------------------- helpers
def load_costmodel(part: str = "model") -> Any:
    """A module of :mod:`lightning_gaussk.costs`: ``"model"`` (links, host costs, bytes and times,
    the one formula of k), ``"policy"`` (the one exchange policy) or ``"planning"`` (node-mode and
    step times, fits)."""
    if part not in ("model", "policy", "planning"):
        raise ValueError(f"load_costmodel: `part` must be 'model', 'policy' or 'planning', got {part!r}")
    return importlib.import_module(f"lightning_gaussk.costs.{part}")


def load_topology() -> Any:
    """:mod:`lightning_gaussk.comm.layout`: the chunks of node mode."""
    return importlib.import_module("lightning_gaussk.comm.layout")


def _driver_section(name: str) -> str:
    """``name`` if it is a section the drivers of the emulated cluster write: any but "selection",
    which benchmarks/selection.py owns and they never touch."""
    if name not in DOC_SECTIONS[1:]:
        raise ValueError(f"section must be one of {DOC_SECTIONS[1:]}, got {name!r}")
    return name


def replace_section(doc: str, name: str, body: str) -> str:
    """:func:`_common.replace_section` of a driver's section (see :func:`_driver_section`)."""
    return _common.replace_section(doc, _driver_section(name), body)


def write_doc_section(path: str, name: str, body: str) -> None:
    """:func:`_common.write_doc_section` of a driver's section (see :func:`_driver_section`)."""
    _common.write_doc_section(path, _driver_section(name), body)


# ---------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="Anything after `--` is the rank script and its arguments.")
    p.add_argument("--world", type=int, default=2, help="hosts, 2..64")
    p.add_argument("--ranks-per-host", type=int, default=1, help="ranks in each host (node-contiguous global ranks)")
    p.add_argument("--rate", default="1gbit", help="per-host link rate each way (tc units: 100mbit, 1gbit, 10gbit)")
    p.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay added per host link (netem)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before the ranks are killed")
    p.add_argument("--dry-run", action="store_true", help="print the commands instead of running them (no root needed)")
    p.add_argument("--netcheck", action="store_true", help="measure the link between host 0 and host 1 with a TCP stream")
    p.add_argument("--netcheck-mb", type=float, default=50.0)
    p.add_argument("--cleanup-stale", action="store_true", help="delete namespaces left by dead runs of this harness")
    p.add_argument("--_netcheck-worker", dest="netcheck_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_out", dest="out", default=None, help=argparse.SUPPRESS)
    p.add_argument("argv", nargs=argparse.REMAINDER)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    script = [a for a in args.argv if a != "--"] if args.argv else []
    if args.netcheck_worker:
        netcheck_worker(int(args.netcheck_mb * 1e6), args.out)
        return 0
    if args.cleanup_stale:
        require_root()
        print("deleted:", cleanup_stale() or "nothing")
        return 0
    spec = ClusterSpec(world=args.world, link=LinkSpec(args.rate, args.delay_ms), ranks_per_host=args.ranks_per_host)
    if args.netcheck:
        script = [os.path.abspath(__file__), "--_netcheck-worker", "--netcheck-mb", str(args.netcheck_mb)]
    if not script:
        build_parser().error("give a rank script after `--`, or --netcheck")
    if args.dry_run:
        for cmd in setup_commands(spec):
            print(" ".join(cmd))
        for r in range(spec.ranks):
            env = rank_env(spec, r, {})
            print(" ".join(f"{k}={v}" for k, v in env.items()), " ".join(rank_command(spec, r, script)))
        for cmd in teardown_commands(spec.namespaces()):
            print(" ".join(cmd))
        return 0
    require_root()
    try:
        with EmulatedCluster(spec) as cluster:
            cluster.run(script, timeout=args.timeout)
            print(EmulatedCluster.tails(cluster.procs[:1], n=2000))
    except ClusterInterrupted as e:
        print(f"emulated cluster: interrupted ({e}); namespaces deleted", file=sys.stderr)
        return 130
    except ClusterError as e:
        print(f"emulated cluster: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
