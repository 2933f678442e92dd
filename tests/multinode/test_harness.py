"""The harness makes separate hosts: own names and addresses, ssh between all of them, nothing left behind."""

import subprocess
from pathlib import Path

from tests.multinode.harness import SUBNET


def test_nodes_are_hosts_that_reach_each_other_over_ssh_and_vanish_on_close(make_cluster):
    real_hosts = Path("/etc/hosts").read_text()
    cluster = make_cluster(3)  # three nodes: the bridge, not just one veth pair
    for index, node in enumerate(cluster.nodes):
        others = ",".join(n.name for n in cluster.nodes)
        fanout = cluster.run_on(index, ["pdsh", "-R", "ssh", "-w", others, "hostname"], timeout=30)
        assert fanout.returncode == 0, fanout.stderr
        assert sorted(fanout.stdout.splitlines()) == sorted(f"{n.name}: {n.name}" for n in cluster.nodes)
        addresses = cluster.run_on(index, ["ip", "-4", "-o", "addr", "show", "eth0"]).stdout
        assert f"inet {node.address}/24" in addresses
    assert Path("/etc/hosts").read_text() == real_hosts  # the hosts file was bind-mounted, never written
    root_addresses = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    assert f"{SUBNET}." not in root_addresses

    namespaces = [node.netns for node in cluster.nodes]
    sshds = [node.sshd_pid for node in cluster.nodes]
    cluster.close()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(netns in listed for netns in namespaces)
    assert not any(Path(f"/proc/{pid}").exists() for pid in sshds)
