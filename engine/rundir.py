"""One run per run dir: a lock file that works on a local disk and on a filesystem shared by several nodes.

``run.dir/run.lock`` holds its owner (host, pid, the pid's start time, when the run started) and is created
atomically: the JSON is written to a private temporary file first and then hard-linked to ``run.lock``
(``link`` fails when the name exists, also over NFS, and nobody can read a half-written lock); filesystems
without hard links get ``O_CREAT | O_EXCL``. ``fcntl`` locks are not used: over NFS they depend on the lock
daemon, and they vanish with the client that held them.

While the run lives, a daemon thread of rank 0 touches the file's mtime (the heartbeat). A lock is stale when

- its owner is on this host and that process is gone (pid plus its start time, so a reused pid or a restarted
  container with the same hostname is recognised), or
- its owner is on another host and the heartbeat is older than ``run.lock_stale_s`` (keep that well above the
  clock skew between the nodes).

A stale lock is taken over with one warning line; a live one refuses the run with one line naming its owner
(``RunDirInUse``, exit 2). The lock is released when ``train()`` ends (also on an exception); a SIGKILL leaves
it behind, which the same-host rule clears at the next start.

With several nodes every rank must see the same run dir: each rank writes its part of every checkpoint there,
and a resume reads all parts and ``latest`` from one place. Right after rank 0 took the lock, every rank looks
for that lock (its token) in its own run.dir; if any rank does not see it, all refuse (``RunDirNotShared``,
exit 2) before anything else is written.
"""

import contextlib
import errno
import json
import os
import secrets
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch.distributed as dist

from engine.config import ConfigError, RunConfig
from engine.console import say

LOCK_NAME = "run.lock"
# A network filesystem may show a file made on another node a moment late (cached lookups): look this long.
SHARED_LOOK_S = 5.0
# Tokens of the locks this job holds (every rank learns rank 0's), so the preflight that ``setup`` runs again
# on every rank does not take this job's own lock for another run's.
_job_tokens: set[str] = set()


class RunDirRefused(ConfigError):
    """Every rank refuses ``run.dir``: rank 0 decided and the others learnt it, so rank 0 alone says why."""


class RunDirInUse(RunDirRefused):
    """Another live run holds ``run.dir``."""


class RunDirNotShared(RunDirRefused):
    """Some rank does not see rank 0's lock in its ``run.dir``: the run dir is not on a shared filesystem."""


@dataclass(frozen=True)
class LockOwner:
    host: str
    pid: int
    pid_start: str | None  # boot id + start time of the pid (Linux); None where /proc is missing
    started: float  # time.time() when the lock was taken
    token: str  # tells one taking of the lock from another (a takeover checks it moved the lock it judged)

    @classmethod
    def this_process(cls) -> "LockOwner":
        pid = os.getpid()
        return cls(socket.gethostname(), pid, process_start(pid), time.time(), secrets.token_hex(8))

    def describe(self, heartbeat_age_s: float) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        return f"host {self.host}, pid {self.pid}, started {started}, heartbeat {heartbeat_age_s:.0f} s ago"


def process_start(pid: int) -> str | None:
    """``<boot id>:<start time in clock ticks>`` of ``pid``, or None when unknown (no /proc, pid gone)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return f"{boot}:{stat.rsplit(')', 1)[1].split()[19]}"  # field 22 of proc(5); the name may hold spaces


def _process_alive(owner: LockOwner) -> bool:
    if owner.pid_start is not None:
        return process_start(owner.pid) == owner.pid_start  # None once the pid is gone
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _read_owner(path: Path) -> tuple[LockOwner | None, float] | None:
    """(owner or None when the file is not a lock we understand, heartbeat age in s); None when absent."""
    try:
        text, mtime = path.read_text(), path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        owner = LockOwner(**json.loads(text))
    except (ValueError, TypeError):
        owner = None
    return owner, max(0.0, time.time() - mtime)


def stale_reason(owner: LockOwner | None, age_s: float, stale_s: float) -> str | None:
    """Why a lock may be taken over, or None while its owner may still be running."""
    here = socket.gethostname()
    if owner is not None and owner.host == here:
        if owner.pid == os.getpid():
            return "left by this process"
        # On the owner's host the process table is the truth; its heartbeat could only be wrong.
        return None if _process_alive(owner) else f"its process {owner.pid} on this host is gone"
    if age_s > stale_s:
        return f"its heartbeat is {age_s:.0f} s old (run.lock_stale_s={stale_s:g})"
    return None


def live_holder(run_dir: Path, stale_s: float) -> str | None:
    """Who holds ``run_dir`` now (one phrase), or None when it is free or stale. Reads only (preflight)."""
    found = _read_owner(Path(run_dir) / LOCK_NAME)
    if found is None or stale_reason(*found, stale_s) is not None:
        return None
    if found[0] is not None and found[0].token in _job_tokens:
        return None
    owner, age = found
    return owner.describe(age) if owner else f"an unreadable lock, heartbeat {age:.0f} s ago"


def in_use_error(cfg: RunConfig, holder: str) -> RunDirInUse:
    lock = Path(cfg.run.dir) / LOCK_NAME
    return RunDirInUse(
        f"{cfg.run.dir} is in use by another run ({holder}; {lock}). Wait for it to end or choose another "
        "run.dir",
        key="run.dir",
        source=cfg.source_of("run.dir"),
    )


class RunDirLock:
    """The lock file of one run dir, held by this process, with its heartbeat thread."""

    def __init__(self, path: Path, owner: LockOwner, stale_s: float):
        self.path, self.owner = path, owner
        self._stop = threading.Event()
        # Several beats within the stale time, so a slow filesystem or a busy node never looks dead.
        interval = min(30.0, max(0.2, stale_s / 6))
        self._thread = threading.Thread(target=self._beat, args=(interval,), name="run-dir-lock", daemon=True)
        self._thread.start()

    @classmethod
    def acquire(cls, run_dir: Path, stale_s: float, cfg: RunConfig) -> "RunDirLock":
        """Take the lock of ``run_dir`` (created if missing), taking over a stale one; raise RunDirInUse."""
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / LOCK_NAME
        owner = LockOwner.this_process()
        for _ in range(5):  # each round either takes the lock or sees a changed one
            if _create(path, owner):
                return cls(path, owner, stale_s)
            found = _read_owner(path)
            if found is None:  # released between our attempt and the read
                continue
            held_by, age = found
            reason = stale_reason(held_by, age, stale_s)
            if reason is None:
                raise in_use_error(
                    cfg, held_by.describe(age) if held_by else f"unreadable lock, {age:.0f} s old"
                )
            if _remove_if_same(path, held_by, owner.token):
                who = held_by.describe(age) if held_by else "an unreadable lock"
                print(
                    f"warning: {path}: taking over a stale lock ({who}): {reason}",
                    file=sys.stderr,
                    flush=True,
                )
        raise in_use_error(cfg, "the lock changed hands while this run tried to take it")

    def release(self) -> None:
        """Stop the heartbeat and delete the lock if it is still ours (never in a forked child)."""
        self._stop.set()
        _job_tokens.discard(self.owner.token)
        if os.getpid() != self.owner.pid:
            return
        found = _read_owner(self.path)
        if found is not None and found[0] == self.owner:
            self.path.unlink(missing_ok=True)

    def _beat(self, interval: float) -> None:
        while not self._stop.wait(interval):
            found = _read_owner(self.path)
            if found is None or found[0] != self.owner:
                say(
                    f"warning: {self.path}: this run lost its run dir lock (another run took it over); "
                    "its heartbeat stops"
                )
                return
            with contextlib.suppress(OSError):  # a full or flaky filesystem: the next beat tries again
                os.utime(self.path)


def _create(path: Path, owner: LockOwner) -> bool:
    """Create ``path`` holding ``owner``, atomically; False when it exists."""
    tmp = path.with_name(f"{path.name}.{owner.token}")
    tmp.write_text(json.dumps(asdict(owner)))
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as error:
        if tmp.stat().st_nlink == 2:  # NFS: the link was made but its reply was lost
            return True
        if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        return _create_exclusive(path, owner)  # no hard links on this filesystem
    finally:
        tmp.unlink(missing_ok=True)


def _create_exclusive(path: Path, owner: LockOwner) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(asdict(owner)))
    return True


def _remove_if_same(path: Path, judged: LockOwner | None, token: str) -> bool:
    """Move the stale lock aside and delete it, unless another run replaced it since we read it.

    ``rename`` is atomic, so of several runs taking over at once one moves the lock; the others find none.
    """
    aside = path.with_name(f"{path.name}.stale-{token}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return False
    moved = _read_owner(aside)
    if (
        moved is not None and moved[0] != judged
    ):  # a fresh lock, taken after we judged the old one: put it back
        with contextlib.suppress(OSError):
            os.link(aside, path)
        aside.unlink(missing_ok=True)
        return False
    aside.unlink(missing_ok=True)
    return True


def lock_run_dir(cfg: RunConfig, *, is_main: bool, world_size: int) -> RunDirLock | None:
    """Collective: rank 0 takes the run dir's lock; every rank raises RunDirInUse when it is held.

    Returns the lock on rank 0, None elsewhere.
    """
    lock, outcome = None, {}
    if is_main:
        try:
            lock = RunDirLock.acquire(Path(cfg.run.dir).expanduser(), cfg.run.lock_stale_s, cfg)
            outcome["token"] = lock.owner.token
        except RunDirInUse as error:
            outcome["refusal"] = str(error)
    if world_size > 1:  # the other ranks must stop too, not wait for rank 0 at the next collective
        box = [outcome]
        dist.broadcast_object_list(box, src=0)
        outcome = box[0]
    if "refusal" in outcome:
        raise RunDirInUse(outcome["refusal"])
    _job_tokens.add(outcome["token"])
    if world_size > 1:
        try:
            check_shared(cfg, outcome["token"], world_size=world_size)
        except RunDirNotShared:
            if lock is not None:
                lock.release()
            raise
    return lock


def check_shared(cfg: RunConfig, token: str, *, world_size: int) -> None:
    """Collective: every rank sees the lock ``token`` (rank 0's) in its run.dir; raise RunDirNotShared on every
    rank when some do not (the message names them and their hosts)."""
    run_dir = Path(cfg.run.dir).expanduser()
    views = [None] * world_size
    dist.all_gather_object(views, (socket.gethostname(), _what_this_rank_sees(run_dir, token)))
    blind = [f"rank {rank} (host {host}): {seen}" for rank, (host, seen) in enumerate(views) if seen]
    if not blind:
        return
    shown = "; ".join(blind[:8]) + (f"; and {len(blind) - 8} more ranks" if len(blind) > 8 else "")
    raise RunDirNotShared(
        f"{run_dir} is not on a filesystem shared by all nodes: {len(blind)} of {world_size} ranks do not see "
        f"rank 0's lock {run_dir / LOCK_NAME} there ({shown}). run.dir must be on a filesystem shared by all "
        "nodes (NFS, Lustre, ...): every rank writes its part of each checkpoint there and a resume reads them "
        "from one place",
        key="run.dir",
        source=cfg.source_of("run.dir"),
    )


def _what_this_rank_sees(run_dir: Path, token: str) -> str | None:
    """None when ``run_dir`` holds the lock ``token``; else what is there instead. Reads only."""
    deadline = time.monotonic() + SHARED_LOOK_S
    while True:
        try:
            os.listdir(run_dir)  # an NFS client revalidates a folder it opens (close-to-open)
            found = _read_owner(run_dir / LOCK_NAME)
        except FileNotFoundError:
            seen = "no such folder"
        except OSError as error:
            seen = f"cannot read it ({error.strerror})"
        else:
            if found is None:
                seen = f"no {LOCK_NAME}"
            elif found[0] is not None and found[0].token == token:
                return None
            else:
                owner = found[0].describe(found[1]) if found[0] else "unreadable"
                seen = f"another run's lock ({owner})"
        if time.monotonic() > deadline:
            return seen
        time.sleep(0.25)
