"""Process-group setup for every way gnn3d is launched: deepspeed, torchrun, or plain ``python``.

Both waits of a multi-node run are bounded:

- the rendezvous: every rank waits at most ``run.rendezvous_timeout_s`` for all WORLD_SIZE ranks to reach the
  store on rank 0's node (MASTER_ADDR:MASTER_PORT). Rank 0 decides when time is up and posts how many ranks
  joined; every rank then exits with ``EXIT_UNAVAILABLE`` and one line saying so. A rank that cannot reach
  the store at all is stopped by a watchdog (torch's client keeps retrying for about three times its timeout).
- collectives: gloo (and NCCL) raise after ``run.collective_timeout_s`` instead of torch's 30 min;
  ``engine.liveness`` then names the rank that went away.

Gloo binds the address that this host's name resolves to; where that is a loopback address (``127.0.1.1``
in a Debian /etc/hosts, ``127.0.0.1`` in many containers) the other nodes cannot connect. Without
GLOO_SOCKET_IFNAME, ``choose_gloo_interface`` picks the interface that routes to MASTER_ADDR.
NCCL picks its own interface; set NCCL_SOCKET_IFNAME where it guesses wrong.
"""

import ipaddress
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from engine.startup import skip_unused_comm_op

# sysexits.h EX_UNAVAILABLE: a rank of the job never joined the rendezvous, or went away during the run.
EXIT_UNAVAILABLE = 69

# Keys in the store; torchrun's agent keeps its store over restarts (--max-restarts), so each attempt has its own.
_JOINED = "gnn3d/rendezvous/{attempt}/joined"  # counter: ranks that reached the store
_OUTCOME = (
    "gnn3d/rendezvous/{attempt}/outcome"  # "complete", or rank 0's count of the ranks that joined in time
)
_COMPLETE = "complete"
_kept: list[dist.TCPStore] = []
# The other ranks wait this much longer than rank 0, so they hear rank 0's count instead of timing out first.
_HEAR_RANK0_S = 5.0
_POLL_S = 0.25
# The watchdog fires this long after a rank's own wait: only a rank stuck in torch's connect loop meets it.
_WATCHDOG_MARGIN_S = 3.0


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class RendezvousFailed(RuntimeError):
    """Not every rank joined within ``run.rendezvous_timeout_s``; the message is the one line to print."""

    def __init__(self, message: str):
        super().__init__(message)
        self.rank = int(os.environ.get("RANK", 0))


def free_port() -> int:
    """An unused TCP port on loopback (for single-process rendezvous and tests)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_single_process_env() -> None:
    """Without a launcher, DeepSpeed would look for MPI; give it a one-process rendezvous instead."""
    if "RANK" in os.environ:
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def init_distributed(rendezvous_timeout_s: float = 600.0, collective_timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group (nccl on CUDA, gloo on CPU) within ``rendezvous_timeout_s`` and pick the device.

    Collectives of the group raise after ``collective_timeout_s``. Raises RendezvousFailed.
    """
    import deepspeed

    ensure_single_process_env()
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        choose_gloo_interface()
        store = rendezvous(rendezvous_timeout_s)
        _kept.append(store)  # rank 0 serves the store from this object: engine.liveness needs it to the end
        timeout = timedelta(seconds=collective_timeout_s)
        store.set_timeout(timeout)  # what torch's own env:// rendezvous leaves on the group's store
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
        skip_unused_comm_op()  # every entry point (train, test scripts, benchmarks): no JIT build of an unused op
        deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=timeout)  # adopts the group
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def master_address() -> str:
    return f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"


def uses_agent_store() -> bool:
    """torchrun's agent already serves the store at MASTER_ADDR:MASTER_PORT; every rank is then a client."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)


def rendezvous(timeout_s: float) -> dist.TCPStore:
    """The store every rank of the job reached, once all WORLD_SIZE have; raises RendezvousFailed after
    ``timeout_s`` (rank 0) or ``timeout_s`` + a few seconds (the others, which hear rank 0's count)."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    where = master_address()
    wait_s = timeout_s if rank == 0 else timeout_s + _HEAR_RANK0_S
    deadline = time.monotonic() + wait_s
    unreachable = RendezvousFailed(
        f"rendezvous failed: the store at {where} (MASTER_ADDR:MASTER_PORT, rank 0's node) did not answer "
        f"within {timeout_s:g} s (run.rendezvous_timeout_s); check that rank 0's node started and that this "
        "node reaches that address (hostfile, firewall)"
    )
    watchdog = threading.Timer(wait_s + _WATCHDOG_MARGIN_S, _give_up, args=(unreachable,))
    watchdog.daemon = True
    watchdog.start()
    try:
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            world_size,
            is_master=rank == 0 and not uses_agent_store(),
            # Longer than the watchdog: torch's client would print a long retry log before giving up.
            timeout=timedelta(seconds=wait_s + 10.0),
            wait_for_workers=False,  # we count the ranks ourselves, so that every rank can say how many came
            multi_tenant=True,
        )
        joined = _wait_for_everyone(store, rank, world_size, deadline) if world_size > 1 else None
    except dist.DistError as err:  # rank 0's store went away while we waited
        raise RendezvousFailed(f"{unreachable} ({str(err).splitlines()[0]})") from None
    finally:
        watchdog.cancel()
    if joined is not None:
        raise RendezvousFailed(
            f"rendezvous failed: {joined} of {world_size} ranks joined at {where} (MASTER_ADDR:MASTER_PORT) "
            f"within {timeout_s:g} s (run.rendezvous_timeout_s); check that every node of the hostfile "
            "started and reaches that address (ssh, firewall, GLOO_SOCKET_IFNAME)"
        )
    return store


def _wait_for_everyone(store: dist.TCPStore, rank: int, world_size: int, deadline: float) -> str | None:
    """None once all ``world_size`` ranks reached ``store``; else how many did by the deadline (rank 0's
    count where the others could hear it)."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    joined_key, outcome_key = _JOINED.format(attempt=attempt), _OUTCOME.format(attempt=attempt)
    if store.add(joined_key, 1) == world_size:
        store.set(outcome_key, _COMPLETE)
    # Polled rather than store.wait(): a wait that times out logs socket warnings from C++.
    while not store.check([outcome_key]):
        if time.monotonic() > deadline:
            if rank != 0:  # rank 0 should have posted its count by now: count ourselves
                return str(store.add(joined_key, 0))
            # Rank 0 decides; a rank joining at this very moment may still win the race with "complete".
            count = store.compare_set(outcome_key, "", str(store.add(joined_key, 0))).decode()
            if count != _COMPLETE:
                time.sleep(1.0)  # this process serves the store: let the others read the count before it goes
            return None if count == _COMPLETE else count
        time.sleep(_POLL_S)
    outcome = store.get(outcome_key).decode()
    return None if outcome == _COMPLETE else outcome


def _give_up(error: RendezvousFailed) -> None:
    """Watchdog: the main thread is stuck in torch's connect loop; say why and end the process."""
    print(f"[rank {error.rank}] {error}", file=sys.stderr, flush=True)
    os._exit(EXIT_UNAVAILABLE)


def choose_gloo_interface() -> str | None:
    """Set GLOO_SOCKET_IFNAME to the interface that routes to MASTER_ADDR (the user's setting wins).

    Returns the interface chosen, or None when nothing was set (set already, or a one-host run on loopback).
    """
    if os.environ.get("GLOO_SOCKET_IFNAME") or int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return None
    try:
        local = _local_address_towards(os.environ["MASTER_ADDR"])
    except OSError:
        return None  # no route (yet): the rendezvous says so in its own words
    master = os.environ["MASTER_ADDR"]
    if ipaddress.ip_address(local).is_loopback:
        # MASTER_ADDR is this host, and its name resolves to loopback (Debian's 127.0.1.1): the other nodes
        # cannot reach that, so take this host's one outward interface, if the job spans several hosts.
        # A literal loopback MASTER_ADDR (127.0.0.1, localhost) means "all on this host": leave gloo alone.
        name = _only_outward_interface() if _spans_hosts() and not _names_loopback(master) else None
        why = f"MASTER_ADDR {master} is this host and resolves to loopback; {name} is its only outward interface"
    else:
        name = _interface_of(local)
        why = f"{local} routes to MASTER_ADDR {master}"
    if name is None:
        return None
    os.environ["GLOO_SOCKET_IFNAME"] = name
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:  # one line per node
        print(
            f"gloo: using interface {name} ({why}); set GLOO_SOCKET_IFNAME to choose another", file=sys.stderr
        )
    return name


def _local_address_towards(host: str) -> str:
    """This host's address on the route to ``host`` (a UDP connect sends nothing, it only picks the route)."""
    family, _, _, _, address = socket.getaddrinfo(host, 9, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        return sock.getsockname()[0]


def _names_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return False


def _spans_hosts() -> bool:
    """More ranks in the job than on this host (LOCAL_WORLD_SIZE is set by deepspeed's launch and torchrun)."""
    local = os.environ.get("LOCAL_WORLD_SIZE")
    return local is not None and int(local) < int(os.environ.get("WORLD_SIZE", 1))


def _only_outward_interface() -> str | None:
    """The one interface that is up and has a non-loopback IPv4 address; None when there are none or several
    (then the user must choose: GLOO_SOCKET_IFNAME)."""
    import psutil  # a dependency of deepspeed

    stats = psutil.net_if_stats()
    names = [
        name
        for name, addresses in psutil.net_if_addrs().items()
        if stats.get(name) is not None and stats[name].isup
        if any(a.family == socket.AF_INET and not a.address.startswith("127.") for a in addresses)
    ]
    return names[0] if len(names) == 1 else None


def _interface_of(address: str) -> str | None:
    import psutil  # a dependency of deepspeed

    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == address for a in addresses):
            return name
    return None
