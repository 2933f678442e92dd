"""Nodes that are lost, or never come, on a two-"node" run on loopback (one rank per node).

- a rank killed mid-run (its sockets close) or frozen (SIGSTOP: a node that vanished without closing them) after
  a checkpoint: the survivor exits 69 within a bounded time with one line naming the lost rank (host, pid) and
  the checkpoint a restart continues from, instead of a gloo traceback or a 30 min hang; with the deepspeed
  launcher (one ``deepspeed --no_ssh --node_rank=K`` per node) both launch commands end and leave no process;
- a node that never joins: every started rank exits 69 within run.rendezvous_timeout_s, saying how many joined;
- gloo's socket interface, chosen to reach MASTER_ADDR.
"""

import contextlib
import os
import signal
import socket
import time
from pathlib import Path

import psutil
import pytest

from engine.distributed import free_port
from tests.engine.runs import losses_by_step, start_node, start_rank, training_pids

EXIT_UNAVAILABLE = 69  # engine.distributed.EXIT_UNAVAILABLE, spelled out so the test also runs on older trees
COLLECTIVE_TIMEOUT_S = 12
# Long enough never to finish while the test runs; a checkpoint every 2 steps, so one exists at the loss.
STEPS = ["run.max_steps=100000", "checkpoint.every=2", "checkpoint.keep_last=2"]
# A killed rank's sockets close, so the survivor's next collective fails at once; it then watches the
# heartbeats for engine.liveness.WINDOW_S (4 s) and exits. 2 busy cores: allow for slow teardown.
KILLED_BOUND_S = 25
# A frozen rank closes nothing: the survivor waits out run.collective_timeout_s (gloo's timeout, then the 4 s
# window; or engine.liveness's watch of the heartbeats, where gloo does not time out).
FROZEN_BOUND_S = COLLECTIVE_TIMEOUT_S + 15


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("demo_cache")


@contextlib.contextmanager
def two_nodes(tmp_path: Path, cache: Path, *overrides: str, launcher: bool):
    """Start both nodes (deepspeed launchers, or bare ranks); yield (processes, logs, run dir, rank 1's pid
    getter); kill whatever is left on the way out."""
    run_dir, port = tmp_path / "run", free_port()
    logs = [tmp_path / f"node{k}.log" for k in (0, 1)]
    if launcher:
        hostfile = tmp_path / "hostfile"
        hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
        nodes = [
            start_node(
                run_dir, cache, *STEPS, *overrides, node_rank=k, hostfile=hostfile, port=port, log=logs[k]
            )
            for k in (0, 1)
        ]
    else:
        nodes = [
            start_rank(run_dir, cache, *STEPS, *overrides, rank=k, world_size=2, port=port, log=logs[k])
            for k in (0, 1)
        ]
    try:
        yield nodes, logs, run_dir, (lambda: training_pids(nodes[1].pid)[0]) if launcher else nodes[1].pid
    finally:
        for node in nodes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGCONT)
                os.killpg(node.pid, signal.SIGKILL)
            node.wait()


def wait_for_step(run_dir: Path, step: int, nodes, logs, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(node.poll() is not None for node in nodes):
            raise AssertionError(
                f"a node ended early:\n{logs[0].read_text()[-3000:]}\n{logs[1].read_text()[-3000:]}"
            )
        if any(r["step"] >= step for r in losses_by_step(run_dir).values()):
            return
        time.sleep(0.1)
    raise AssertionError(f"step {step} never logged")


def processes_of(run_dir: Path) -> list[int]:
    """Every process still running for this run (launchers, ranks, data workers): its run dir is unique."""
    needle = f"run.dir={run_dir}"
    pids = []
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error, TypeError):
            if any(needle in arg for arg in proc.info["cmdline"]) and proc.status() != psutil.STATUS_ZOMBIE:
                pids.append(proc.pid)
    return pids


def survivor_line(out: str, victim: int) -> str:
    [line] = [line for line in out.splitlines() if "lost rank" in line]
    assert line.startswith(f"[rank 0] lost rank 1 (host {socket.gethostname()}, pid {victim}): "), line
    assert "last good checkpoint: " in line and "/checkpoints/step0000000" in line, line
    assert "Traceback" not in out and "pair.cc" not in out, out[-3000:]  # one line, no gloo traceback
    return line


@pytest.mark.slow
@pytest.mark.multiproc
def test_killed_rank_is_named_and_the_survivor_exits_at_once(tmp_path, demo_cache):
    with two_nodes(tmp_path, demo_cache, launcher=True) as (nodes, logs, run_dir, victim):
        wait_for_step(run_dir, 3, nodes, logs)
        victim = victim()
        os.kill(victim, signal.SIGKILL)
        lost_at = time.monotonic()
        code = nodes[0].wait(timeout=KILLED_BOUND_S + 60)
        took = time.monotonic() - lost_at
        out = logs[0].read_text()
        assert took < KILLED_BOUND_S, (
            f"the survivor took {took:.0f} s (bound {KILLED_BOUND_S} s):\n{out[-3000:]}"
        )
        nodes[1].wait(timeout=60)  # node 1's launcher ends once its rank is gone
        for pid in processes_of(run_dir):  # neither launcher left a rank or data worker behind
            with contextlib.suppress(psutil.Error):
                pytest.fail(f"left behind: {pid} {psutil.Process(pid).cmdline()[:4]}")
    assert code == EXIT_UNAVAILABLE, out[-3000:]  # the deepspeed runner passes rank 0's code on
    line = survivor_line(out, victim)
    assert "Connection reset by peer" in line or "Connection closed by peer" in line, line  # noticed at once


@pytest.mark.slow
@pytest.mark.multiproc
def test_frozen_node_is_named_after_the_collective_timeout(tmp_path, demo_cache):
    overrides = (f"run.collective_timeout_s={COLLECTIVE_TIMEOUT_S}",)
    with two_nodes(tmp_path, demo_cache, *overrides, launcher=False) as (ranks, logs, run_dir, victim):
        wait_for_step(run_dir, 3, ranks, logs)
        os.kill(victim, signal.SIGSTOP)  # no FIN, no RST: as a node that lost power or its network
        lost_at = time.monotonic()
        code = ranks[0].wait(timeout=FROZEN_BOUND_S + 60)
        took = time.monotonic() - lost_at
        out = logs[0].read_text()
        assert took < FROZEN_BOUND_S, (
            f"the survivor took {took:.0f} s (bound {FROZEN_BOUND_S} s):\n{out[-3000:]}"
        )
    assert code == EXIT_UNAVAILABLE, out[-3000:]
    line = survivor_line(out, victim)  # nothing but the timeout told the survivor: gloo's, or the heartbeats'
    assert "Timed out" in line or f"(run.collective_timeout_s={COLLECTIVE_TIMEOUT_S})" in line, line


@pytest.mark.slow
@pytest.mark.multiproc
def test_node_that_never_joins_stops_the_others_within_the_rendezvous_timeout(tmp_path, demo_cache):
    """World size 3, two ranks started: both exit 69 within run.rendezvous_timeout_s (+ their start-up) with
    one line saying 2 of 3 ranks joined, and where."""
    port, timeout_s = free_port(), 5
    logs = [tmp_path / f"rank{k}.log" for k in (0, 1)]
    started = time.monotonic()
    ranks = [
        start_rank(
            tmp_path / "run",
            demo_cache,
            f"run.rendezvous_timeout_s={timeout_s}",
            rank=k,
            world_size=3,
            port=port,
            log=logs[k],
        )
        for k in (0, 1)
    ]
    try:
        codes = [rank.wait(timeout=timeout_s + 120) for rank in ranks]
    finally:
        for rank in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(rank.pid, signal.SIGKILL)
    took = time.monotonic() - started
    outs = [log.read_text() for log in logs]
    assert codes == [EXIT_UNAVAILABLE] * 2, f"{codes}\n{outs[0][-3000:]}\n{outs[1][-3000:]}"
    for rank, out in enumerate(outs):
        [line] = [line for line in out.splitlines() if "rendezvous failed" in line]
        assert line.startswith(f"[rank {rank}] rendezvous failed: 2 of 3 ranks joined at 127.0.0.1:{port}"), (
            line
        )
        assert f"within {timeout_s} s (run.rendezvous_timeout_s)" in line, line
    # Start-up (imports, preflight) on 2 busy cores takes most of it; without the bound this waits 30 min.
    assert took < timeout_s + 60, f"took {took:.0f} s"


def test_gloo_interface_is_the_one_that_routes_to_the_master(monkeypatch):
    """Gloo binds the address this host's name resolves to; in containers and Debian's /etc/hosts that is
    loopback, which other nodes cannot reach (measured: "connectFullMesh failed ... remote=[127.0.0.1]").
    Without GLOO_SOCKET_IFNAME, the interface that routes to MASTER_ADDR is chosen; the user's choice wins."""
    from engine.distributed import choose_gloo_interface

    addresses = {
        a.address: name
        for name, found in psutil.net_if_addrs().items()
        for a in found
        if a.family == socket.AF_INET and not a.address.startswith("127.")
    }
    if not addresses:
        pytest.skip("no non-loopback IPv4 address on this machine")
    master, interface = next(iter(addresses.items()))
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", master)
    assert choose_gloo_interface() == interface
    assert os.environ["GLOO_SOCKET_IFNAME"] == interface
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # the user's setting wins
    assert choose_gloo_interface() is None and os.environ["GLOO_SOCKET_IFNAME"] == "lo"
    monkeypatch.delenv("GLOO_SOCKET_IFNAME")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # one host: gloo's loopback is right
    assert choose_gloo_interface() is None and "GLOO_SOCKET_IFNAME" not in os.environ


def test_gloo_interface_on_a_master_whose_own_name_resolves_to_loopback(monkeypatch):
    """Debian maps a host's own name to 127.0.1.1: the master node's route to MASTER_ADDR is loopback, yet the
    other nodes must reach it. With ranks on other hosts, its one outward interface is chosen; an explicit
    loopback MASTER_ADDR or a one-host job leaves gloo alone. (tests/multinode runs this across hosts.)"""
    from engine.distributed import choose_gloo_interface

    name = socket.gethostname()
    try:
        resolves_to_loopback = socket.gethostbyname(name).startswith("127.")
    except OSError:
        resolves_to_loopback = False
    stats = psutil.net_if_stats()
    outward = [
        interface
        for interface, found in psutil.net_if_addrs().items()
        if interface in stats and stats[interface].isup
        if any(a.family == socket.AF_INET and not a.address.startswith("127.") for a in found)
    ]
    if not resolves_to_loopback or len(outward) != 1:
        pytest.skip("needs a host name resolving to loopback and exactly one outward interface")
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", name)
    assert choose_gloo_interface() == outward[0]
    monkeypatch.delenv("GLOO_SOCKET_IFNAME")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # every rank on this host: loopback is right
    assert choose_gloo_interface() is None and "GLOO_SOCKET_IFNAME" not in os.environ
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # said so explicitly: all on this host
    assert choose_gloo_interface() is None and "GLOO_SOCKET_IFNAME" not in os.environ
