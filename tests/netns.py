"""A real multi-node Ray cluster on one machine: each node in a network namespace of its own, with its own
address on one virtual switch, token authentication, and faults made the way they happen (a link goes
down, a raylet is SIGKILLed). Everything runs inside namespaces this module creates, so it is torn down
by the namespaces' own PIDs (`ip netns pids`), never with `ray stop`, which would end every Ray process
on the machine.

Topology: namespace `bdnet-sw` holds a bridge; node i lives in `bdnet-n{i}` with eth0 = 10.231.0.{i+1}
(node 0 is the head, GCS on port 6390), plugged into the bridge by a veth pair whose switch end is
`bdnet-p{i}`. Pulling that end down is a cut cable. An extra namespace (e.g. an S3 server's) is plugged
in the same way with the address asked for."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from helpers import token_cluster_env

PREFIX = "bdnet-"
SWITCH = PREFIX + "sw"
SUBNET = "10.231.0"
GCS_PORT = 6390
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINDIR = os.path.dirname(sys.executable)


class NetnsUnavailable(RuntimeError):
    """This machine cannot make network namespaces (not root, no `ip`, or no netns support)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def unavailable_reason() -> str | None:
    """Why namespaces cannot be used here, or None when they can (tried for real, then removed)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = PREFIX + "probe"
    try:
        _ip("netns", "add", probe)
    except (subprocess.CalledProcessError, OSError) as exc:
        return f"`ip netns add` failed: {getattr(exc, 'stderr', '') or exc}".strip()
    _ip("netns", "del", probe, check=False)
    return None


def namespaces() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [ln.split()[0] for ln in out.splitlines() if ln.split() and ln.split()[0].startswith(PREFIX)]


def kill_namespace(name: str) -> None:
    """End every process in namespace `name` (TERM, then KILL), then delete it (its veths go with it)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [int(p) for p in _ip("netns", "pids", name, check=False).stdout.split()]
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + (3 if sig == signal.SIGTERM else 10)
        while pids and time.time() < deadline:
            pids = [int(p) for p in _ip("netns", "pids", name, check=False).stdout.split()]
            time.sleep(0.1)
        if not pids:
            break
    _ip("netns", "del", name, check=False)


def remove_leftovers() -> None:
    """Namespaces of ours an earlier, killed test run left behind (only the `bdnet-` prefix)."""
    for name in namespaces():
        kill_namespace(name)


def _processes_naming(text: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if text.encode() in fh.read():
                    found.append(int(pid))
        except OSError:
            continue
    return found


@dataclass
class Node:
    index: int
    ns: str
    address: str
    temp_dir: str


@dataclass
class NetCluster:
    """Nodes in namespaces; `env` is what every Ray process and driver of the cluster gets (token auth)."""

    temp_root: str
    env: dict
    nodes: list[Node] = field(default_factory=list)
    made: list[str] = field(default_factory=list)  # every namespace this cluster created, in order

    @property
    def head(self) -> Node:
        return self.nodes[0]

    @property
    def gcs(self) -> str:
        return f"{self.head.address}:{GCS_PORT}"

    # --- building -------------------------------------------------------------------------------

    def add_namespace(self, name: str, address: str, port_name: str) -> None:
        """Namespace `name` with eth0 = `address`, plugged into the switch through `port_name`."""
        _ip("netns", "add", name)
        self.made.append(name)
        _ip("link", "add", "eth0", "netns", name, "type", "veth", "peer", "name", port_name, "netns", SWITCH)
        _ip("-n", SWITCH, "link", "set", port_name, "master", "br0", "up")
        _ip("-n", name, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", name, "link", "set", "eth0", "up")
        _ip("-n", name, "link", "set", "lo", "up")

    def exec_cmd(self, ns: str, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", ns, *cmd]

    def start_node(self, index: int, num_cpus: int = 1, dashboard: bool = False) -> Node:
        ns, address = f"{PREFIX}n{index}", f"{SUBNET}.{index + 1}"
        self.add_namespace(ns, address, f"{PREFIX}p{index}")
        # Short path: Ray's unix sockets live under the temp dir and have a length limit.
        node = Node(index, ns, address, tempfile.mkdtemp(prefix=f"n{index}-", dir=self.temp_root))
        ray = os.path.join(BINDIR, "ray")
        common = [f"--node-ip-address={address}", f"--num-cpus={num_cpus}", f"--temp-dir={node.temp_dir}",
                  "--disable-usage-stats", "--object-store-memory=150000000"]
        if index == 0:
            cmd = [ray, "start", "--head", f"--port={GCS_PORT}", *common,
                   f"--include-dashboard={'true' if dashboard else 'false'}", "--dashboard-host=0.0.0.0"]
        else:
            cmd = [ray, "start", f"--address={self.gcs}", *common]
        for attempt in (1, 2):
            started = subprocess.run(self.exec_cmd(ns, cmd), env=self.env, capture_output=True, text=True,
                                     timeout=180)
            if started.returncode == 0:
                break
            # On a loaded machine a raylet may miss `ray start`'s 30 s registration wait: once more, afresh.
            for pid in self.pids(ns):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if attempt == 2:
                raise RuntimeError(f"ray start on {ns} failed: {started.stdout[-2000:]}{started.stderr[-2000:]}")
        self.nodes.append(node)
        return node

    def wait_for_nodes(self, n: int, timeout: float = 120) -> None:
        code = ("import ray,sys;ray.init(address=sys.argv[1],configure_logging=False,log_to_driver=False);"
                "print(sum(1 for x in ray.nodes() if x['Alive']))")
        deadline = time.time() + timeout
        while True:
            r = subprocess.run(self.exec_cmd(self.head.ns, [sys.executable, "-c", code, self.gcs]), env=self.env,
                               capture_output=True, text=True, timeout=120)
            if r.stdout.strip().splitlines()[-1:] == [str(n)]:
                return
            if time.time() > deadline:
                raise RuntimeError(f"{n} nodes did not join within {timeout}s: {r.stdout[-500:]}{r.stderr[-1500:]}")
            time.sleep(1)

    # --- faults ---------------------------------------------------------------------------------

    def link(self, port_name: str, up: bool) -> None:
        """Plug or unplug a namespace's cable at the switch (its own end sees the carrier go)."""
        _ip("-n", SWITCH, "link", "set", port_name, "up" if up else "down")

    def cut(self, index: int, up: bool = False) -> None:
        self.link(f"{PREFIX}p{index}", up)

    def pids(self, ns: str) -> list[int]:
        return [int(p) for p in _ip("netns", "pids", ns, check=False).stdout.split()]

    def raylet_pid(self, index: int) -> int:
        for pid in self.pids(self.nodes[index].ns):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    argv0 = fh.read().split(b"\0")[0]
            except OSError:
                continue
            if argv0.endswith(b"/raylet"):
                return pid
        raise RuntimeError(f"no raylet in {self.nodes[index].ns}")

    def tx_bytes(self, index: int) -> int:
        """Bytes node `index` sent over its link (its switch port received them)."""
        out = _ip("-n", SWITCH, "-s", "link", "show", f"{PREFIX}p{index}").stdout.splitlines()
        rx = next(i for i, ln in enumerate(out) if ln.strip().startswith("RX:"))
        return int(out[rx + 1].split()[0])

    # --- the end --------------------------------------------------------------------------------

    def teardown(self) -> list[str]:
        """Kill every process of every namespace we made, delete them; returns what is still left: our
        namespaces, and processes that name this cluster's temp dir (every Ray process of its nodes)."""
        for name in reversed(self.made):
            kill_namespace(name)
        left = namespaces() + [f"pid {pid}" for pid in _processes_naming(self.temp_root)]
        shutil.rmtree(self.temp_root, ignore_errors=True)
        return left


def build(num_nodes: int, dashboard: bool = False) -> NetCluster:
    """A head and `num_nodes - 1` workers, 1 CPU each, token auth with a token of this cluster's own."""
    remove_leftovers()
    # The nodes' workers import this checkout's batch_detect.
    temp_root, env = token_cluster_env(
        PREFIX, PYTHONPATH=ROOT + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""))
    cluster = NetCluster(temp_root, env)
    try:
        _ip("netns", "add", SWITCH)
        cluster.made.append(SWITCH)
        _ip("-n", SWITCH, "link", "add", "br0", "type", "bridge")
        _ip("-n", SWITCH, "link", "set", "br0", "up")
        for i in range(num_nodes):
            cluster.start_node(i, dashboard=dashboard and i == 0)
        cluster.wait_for_nodes(num_nodes)
    except BaseException:
        cluster.teardown()
        raise
    return cluster
