"""Fixtures: a started cluster of network-namespace "hosts", always torn down; skipped only where none can be made."""

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.multinode.harness import Cluster, unavailable_reason


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """``make_cluster(size, **options)`` → a started Cluster (options: see Cluster); all closed after the test."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    made: list[Cluster] = []

    def make(size: int = 2, **options) -> Cluster:
        cluster = Cluster(tmp_path / f"cluster{len(made)}", size, **options)
        made.append(cluster)  # before start(): a half-made cluster is torn down too
        return cluster.start()

    try:
        yield make
    finally:
        for cluster in made:
            cluster.close()


@pytest.fixture
def cluster(make_cluster) -> Cluster:
    """Two nodes, node0 and node1, each with its own sshd; run commands on them with ``command_on``."""
    return make_cluster(2)
