"""Real "hosts" on one machine: network namespaces joined by veth, an sshd in each, names via our own files.

Every node is a network namespace (its own ``eth0`` on a private subnet, plugged into a bridge in a
switch namespace) plus a private mount and UTS namespace in which the harness bind-mounts its hosts file
over /etc/hosts and its ssh client config over /etc/ssh/ssh_config, and sets the hostname to the node's
name. The node's sshd runs in those namespaces, so every command that arrives over ssh (pdsh's, the
DeepSpeed runner's ``ssh <host> hostname``) sees the same files; the head command joins them with nsenter.
The client config goes over the system-wide file rather than ~/.ssh/config, which ssh reads from the
passwd home and which need not exist (a mount needs a file to cover). Nothing is configured in the root
namespace: the real /etc/hosts, /etc/ssh, /run and ~/.ssh stay untouched.
"""

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SUBNET = "192.168.77"  # /24; exists only inside the namespaces, so parallel sessions cannot collide
SILENT_ADDRESS = f"{SUBNET}.250"  # in the subnet, nothing behind it: a host that does not answer
SILENT_HOST = "silent-node"
TOOLS = ("ip", "unshare", "nsenter", "mount", "sshd", "ssh", "ssh-keygen", "pdsh")
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
_clusters = itertools.count()  # namespace names: gnn3d-<pid>-<cluster>-<node>, unique per test session


class HarnessError(RuntimeError):
    """A node could not be set up (names the node and what failed)."""


def unavailable_reason() -> str | None:
    """Why namespaces with sshd cannot be made here (None when they can): the tests skip with it."""
    if os.geteuid() != 0:
        return "multi-node harness needs root (network namespaces, mounts)"
    missing = [tool for tool in TOOLS if shutil.which(tool, path=SBIN_PATH) is None]
    if missing:
        return f"multi-node harness needs {', '.join(missing)} (apt: openssh-server pdsh iproute2)"
    probe = f"gnn3d-{os.getpid()}-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], check=True)
    return None


@dataclass(frozen=True)
class Node:
    name: str
    address: str
    netns: str
    sshd_pid: int  # holds the node's mount/UTS namespaces; commands join them through it


class Cluster:
    """``size`` nodes named node0..node{size-1}.

    ``private_dirs``: existing folders; each node mounts its own empty tmpfs over them (a disk the others
    do not see).
    ``hostname_on_loopback``: each node's /etc/hosts maps its own name to 127.0.1.1 first, as Debian and
    Ubuntu install it; gloo then binds loopback unless told the interface (GLOO_SOCKET_IFNAME).
    """

    def __init__(
        self, workdir: Path, size: int, private_dirs: Sequence[Path] = (), hostname_on_loopback: bool = False
    ):
        self.workdir = workdir
        self.hostname_on_loopback = hostname_on_loopback
        self.prefix = f"gnn3d-{os.getpid()}-{next(_clusters)}"
        self.switch = f"{self.prefix}-sw"
        self.names = [f"node{i}" for i in range(size)]
        self.private_dirs = [Path(d) for d in private_dirs]
        self.nodes: list[Node] = []
        self.client_key = workdir / "id_ed25519"
        self.ssh_config = workdir / "ssh_config"
        self._namespaces: list[str] = []
        self._sshds: list[subprocess.Popen] = []

    def address(self, index: int) -> str:
        return f"{SUBNET}.{index + 1}"

    # --- set-up ---------------------------------------------------------------------------------

    def start(self) -> "Cluster":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._write_client_files()
        self._make_network()
        for index, name in enumerate(self.names):
            self.nodes.append(self._start_node(index, name))
        for node in self.nodes:
            self._wait_listening(node)
        return self

    def _write_client_files(self) -> None:
        keygen(self.client_key)
        (self.workdir / "authorized_keys").write_text(self.client_key.with_suffix(".pub").read_text())
        self.ssh_config.write_text(
            "Host *\n"
            "    User root\n"
            f"    IdentityFile {self.client_key}\n"
            "    IdentitiesOnly yes\n"
            f"    UserKnownHostsFile {self.workdir / 'known_hosts'}\n"
            "    GlobalKnownHostsFile /dev/null\n"
            "    StrictHostKeyChecking yes\n"
            "    BatchMode yes\n"
            "    ConnectTimeout 5\n"
            "    LogLevel ERROR\n"
        )
        known = []
        for index, name in enumerate(self.names):
            host_key = self.workdir / name / "ssh_host_ed25519_key"
            host_key.parent.mkdir(exist_ok=True)
            keygen(host_key)
            public = " ".join(host_key.with_suffix(".pub").read_text().split()[:2])
            known.append(f"{name},{self.address(index)} {public}")
        (self.workdir / "known_hosts").write_text("\n".join(known) + "\n")

    def _hosts_file(self, index: int) -> Path:
        own = [f"127.0.1.1 {self.names[index]}"] if self.hostname_on_loopback else []
        hosts = ["127.0.0.1 localhost", *own]
        hosts += [f"{self.address(i)} {name}" for i, name in enumerate(self.names)]
        hosts.append(f"{SILENT_ADDRESS} {SILENT_HOST}")
        path = self.workdir / self.names[index] / "hosts"
        path.write_text("\n".join(hosts) + "\n")
        return path

    def _make_network(self) -> None:
        # One bridge in a switch namespace, one veth per node: the same code for 2 nodes or 20.
        self._add_netns(self.switch)
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")
        for index, name in enumerate(self.names):
            netns = f"{self.prefix}-{name}"
            self._add_netns(netns)
            port = f"port{index}"
            ip(
                "link",
                "add",
                "eth0",
                "netns",
                netns,
                "type",
                "veth",
                "peer",
                "name",
                port,
                "netns",
                self.switch,
            )
            ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
            ip("-n", netns, "addr", "add", f"{self.address(index)}/24", "dev", "eth0")
            ip("-n", netns, "link", "set", "eth0", "up")
            ip("-n", netns, "link", "set", "lo", "up")
            # The silent host: its frames go to a MAC nobody has and are dropped, so a connect gets no
            # answer at all (no ARP failure, no reset) -- a powered-off host behind a switch.
            ip(
                "-n",
                netns,
                "neigh",
                "add",
                SILENT_ADDRESS,
                "lladdr",
                "02:00:00:00:00:fa",
                "nud",
                "permanent",
                "dev",
                "eth0",
            )

    def _add_netns(self, netns: str) -> None:
        ip("netns", "add", netns)
        self._namespaces.append(netns)

    def _start_node(self, index: int, name: str) -> Node:
        node_dir = self.workdir / name
        sshd_config = node_dir / "sshd_config"
        sshd_config.write_text(
            f"ListenAddress {self.address(index)}\n"
            f"HostKey {node_dir / 'ssh_host_ed25519_key'}\n"
            f"PidFile {node_dir / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {self.workdir / 'authorized_keys'}\n"
            "PermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            "StrictModes no\n"  # the keys live in a pytest tmp dir, whatever its modes
            "PrintMotd no\n"
            "MaxStartups 100\n"  # pdsh opens one connection per node at once
        )
        mounts = [
            "mount -t tmpfs -o mode=755 tmpfs /run",  # sshd's /run/sshd, without touching the real /run
            "mkdir /run/sshd",
            f"mount --bind {self._hosts_file(index)} /etc/hosts",
            f"mount --bind {self.ssh_config} /etc/ssh/ssh_config",
            *[f"mount -t tmpfs tmpfs {d}" for d in self.private_dirs],
            f"hostname {name}",
        ]
        script = (
            " && ".join(mounts) + f" && exec {shutil.which('sshd', path=SBIN_PATH)} -D -e -f {sshd_config}"
        )
        netns = f"{self.prefix}-{name}"
        namespaces = ["ip", "netns", "exec", netns, "unshare", "--mount", "--uts", "--propagation", "private"]
        with (node_dir / "sshd.log").open("w") as log:
            sshd = subprocess.Popen(
                [*namespaces, "sh", "-c", script],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._sshds.append(sshd)
        return Node(name, self.address(index), netns, sshd.pid)  # exec all the way down: this pid is sshd

    def _wait_listening(self, node: Node, timeout: float = 10.0) -> None:
        log = self.workdir / node.name / "sshd.log"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "Server listening" in log.read_text():
                return
            if self._sshds[self.nodes.index(node)].poll() is not None:
                break
            time.sleep(0.05)
        raise HarnessError(f"sshd on {node.name} did not start: {log.read_text()[-2000:]}")

    # --- use ------------------------------------------------------------------------------------

    def command_on(self, index: int, args: Sequence[str], cwd: Path = Path("/")) -> list[str]:
        """``args`` run in ``cwd`` on node ``index`` (its network, mount and UTS namespaces)."""
        pid = str(self.nodes[index].sshd_pid)
        return ["nsenter", "-t", pid, "--net", "--mount", "--uts", f"--wd={cwd}", "--", *args]

    def run_on(
        self, index: int, args: Sequence[str], cwd: Path = Path("/"), **kwargs
    ) -> subprocess.CompletedProcess:
        return subprocess.run(self.command_on(index, args, cwd), capture_output=True, text=True, **kwargs)

    def pids_on(self, index: int) -> list[int]:
        """Every process in node ``index``'s network namespace (sshd, its sessions, what they started)."""
        return _netns_pids(self.nodes[index].netns)

    def write_hostfile(self, path: Path, slots: int) -> Path:
        """A DeepSpeed hostfile naming every node with ``slots`` processes."""
        path.write_text("".join(f"{name} slots={slots}\n" for name in self.names))
        return path

    # --- tear-down ------------------------------------------------------------------------------

    def close(self) -> None:
        """Kill every process in the namespaces, then delete them (their mounts go with them)."""
        for sshd in self._sshds:  # first: no new sessions while we clear the rest
            _kill(sshd.pid)
            sshd.wait(timeout=10)
        for _ in range(50):  # a launcher may start a child between our listing and our kill: list again
            left = [pid for netns in self._namespaces for pid in _netns_pids(netns)]
            if not left:
                break
            for pid in left:
                _kill(pid)
            time.sleep(0.1)
        for netns in reversed(self._namespaces):
            subprocess.run(["ip", "netns", "delete", netns], capture_output=True)
        self._namespaces.clear()


def ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise HarnessError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


def _netns_pids(netns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True)
    return [int(pid) for pid in out.stdout.split()]


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
