"""Writes that fail for lack of room (disk full, quota, file size limit), told in one line: what, where, how much.

A checkpoint save is collective, so a rank whose write fails must not leave the others waiting at a barrier:
``WriteLog`` records a rank's failed writes (DeepSpeed's own included) and ``WriteLog.agree`` replaces the
barrier after them, so every rank learns of any failure and all stop together.

torch's checkpoint writer loses the errno (``unexpected pos 3317184 vs 3317088``), so when an error's text
does not say why, the file's filesystem and the process's ``RLIMIT_FSIZE`` are looked at directly.
CPython ignores SIGXFSZ at start-up, so a write past ``RLIMIT_FSIZE`` raises EFBIG instead of killing the
process (and the forked data workers inherit that).
"""

import errno
import resource
import shutil
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch.distributed as dist

# sysexits.h EX_IOERR: the run stopped on an I/O error it cannot fix itself. The previous checkpoint is
# intact; free space (or raise the limit) and start again, and it resumes from there.
EXIT_STORAGE = 74
STORAGE_ADVICE = "Free space (or raise the limit) and start again: the run resumes from `latest`"

REASONS = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file size limit (RLIMIT_FSIZE, ulimit -f) reached",
}
# How writers that are not Python's own name the errno in their messages (libstdc++, Rust std).
_TEXT_ERRNOS = (
    ("No space left on device", errno.ENOSPC),
    ("os error 28", errno.ENOSPC),
    ("Disk quota exceeded", errno.EDQUOT),
    ("os error 122", errno.EDQUOT),
    ("File too large", errno.EFBIG),
    ("os error 27", errno.EFBIG),
)
# Under this many free bytes a failed write is put down to a full disk (the writer's message lost the errno).
NEARLY_FULL = 16 << 20


class StorageFull(Exception):
    """A write failed for lack of room; the message names the file, the reason and the free bytes."""


def free_bytes(path: Path) -> int:
    """Free bytes (for this user) on the filesystem of ``path`` or of its nearest existing parent."""
    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return shutil.disk_usage(existing).free


def storage_errno(error: BaseException, path: Path) -> int | None:
    """ENOSPC, EDQUOT or EFBIG when ``error``, raised writing ``path``, came from a lack of room; else None."""
    if isinstance(error, OSError) and error.errno in REASONS:
        return error.errno
    text = str(error)
    for phrase, code in _TEXT_ERRNOS:
        if phrase in text:
            return code
    if not isinstance(error, OSError | RuntimeError):
        return None
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and Path(path).is_file() and Path(path).stat().st_size >= limit:
        return errno.EFBIG
    if free_bytes(path) < NEARLY_FULL:
        return errno.ENOSPC
    return None


def describe(code: int, path: Path) -> str:
    """One line: the reason, the file and the free bytes (and the limit for EFBIG)."""
    line = f"{REASONS[code]} writing {path} ({free_bytes(path):,} bytes free there"
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if code == errno.EFBIG and limit != resource.RLIM_INFINITY:
        line += f"; RLIMIT_FSIZE is {limit:,} bytes"
    return line + ")"


def as_storage_full(error: BaseException) -> StorageFull | None:
    """A StorageFull for an OSError that names its file and lacked room (a log line, a config), else None."""
    if isinstance(error, StorageFull):
        return error
    if isinstance(error, OSError) and error.errno in REASONS and error.filename:
        return StorageFull(describe(error.errno, Path(error.filename)))
    return None


class WriteLog:
    """The first failed write of this rank during one collective save; later writes still run, so every rank
    goes through the same collectives (the EMA gather, DeepSpeed's barriers) before ``agree``."""

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.path: Path | None = None

    def attempt(self, path: Path, write: Callable[[Path], Any]) -> None:
        """``write(path)``, recording instead of raising what it raises."""
        try:
            write(path)
        except Exception as error:
            if self.error is None:
                self.error, self.path = error, Path(path)

    def agree(self, what: str, *, remove_partial: Path | None = None) -> None:
        """Collective (a barrier too): raise on every rank when any rank's write failed.

        A lack of room raises StorageFull with the first failed rank's line; any other error is re-raised
        with its traceback by the rank that had it (the others raise RuntimeError naming that rank).
        ``remove_partial`` (give it on one rank) is deleted first, giving back the room a partial save took.
        """
        # Held here, the error's traceback (which reaches the training loop's frame through this save's) would
        # form a reference cycle: the loop's DataLoader workers would outlive the run until a gc pass.
        error, self.error = self.error, None
        mine = None
        if error is not None:
            code = storage_errno(error, self.path)
            line = describe(code, self.path) if code else f"{type(error).__name__}: {error}"
            mine = (code is not None, line)
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        failed = [(rank, report) for rank, report in enumerate(everyone) if report is not None]
        if not failed:
            return
        if remove_partial is not None:
            shutil.rmtree(remove_partial, ignore_errors=True)
        if all(lack_of_room for _, (lack_of_room, _) in failed):
            rank, (_, line) = failed[0]
            raise StorageFull(f"{what}: {line}" + (f" (rank {rank})" if len(everyone) > 1 else ""))
        if mine is not None and not mine[0]:
            try:
                raise error
            finally:
                error = None  # the raised error's traceback holds this frame
        rank, (_, line) = next((r, report) for r, report in failed if not report[0])
        raise RuntimeError(f"{what}: rank {rank} failed: {line}")


@contextmanager
def recording_deepspeed_writes(engine: Any, writes: WriteLog) -> Iterator[None]:
    """Inside, DeepSpeed's checkpoint file writes record their failure in ``writes`` instead of raising.

    DeepSpeed's ``save_checkpoint`` ends with a barrier; a rank whose ``torch.save`` raised would skip it and
    leave the others waiting there for ever.
    """
    checkpoint_engine = engine.checkpoint_engine
    save, copy_scripts = checkpoint_engine.save, engine._copy_recovery_script

    def recorded_save(state_dict, path, *args, **kwargs):
        writes.attempt(Path(path), lambda _: save(state_dict, path, *args, **kwargs))

    def recorded_copy(save_path):  # rank 0 copies zero_to_fp32.py next to the checkpoints on every save
        writes.attempt(Path(save_path) / "zero_to_fp32.py", lambda _: copy_scripts(save_path))

    with ExitStack() as stack:
        stack.enter_context(_patched(checkpoint_engine, "save", recorded_save))
        stack.enter_context(_patched(engine, "_copy_recovery_script", recorded_copy))
        yield


@contextmanager
def _patched(obj: Any, name: str, replacement: Any) -> Iterator[None]:
    """``obj.name`` is ``replacement`` inside (an instance attribute), as before afterwards."""
    had_own = name in vars(obj)
    before = vars(obj).get(name)
    setattr(obj, name, replacement)
    try:
        yield
    finally:
        if had_own:
            setattr(obj, name, before)
        else:
            delattr(obj, name)
