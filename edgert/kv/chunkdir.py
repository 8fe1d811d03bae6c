"""ChunkDir: the directory of KV chunk files that every process and model shares.

One ``kv_cache.dir`` holds one subdirectory per model (``DIR/<fingerprint hex>/``) and one
budget. Whoever makes room or reserves space for a new chunk holds ``DIR/.lock``
(`fcntl.flock`, exclusive) and counts every file under DIR while holding it. The count is a
scan, not a saved index: nothing a crashed process left can make it wrong, and the kernel
drops a dead process's flock, so a crash never leaves the directory locked.

NOTE: a writer reserves its chunk's bytes under the lock by creating its temporary file
(``.NAME.PID.TID.tmp``) at the chunk's full size, writes it without the lock, and renames it
under the lock again (a directory listing taken during a rename may miss both names).
Outside the lock the files under DIR therefore only shrink or keep their size (writes fill
reserved bytes), so the directory is within the budget of its last writer at every
instant, not only after a scan. A temporary file whose writer is gone is deleted by the
next scan.
"""
from __future__ import annotations

import fcntl
import logging
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger(__name__)
SUFFIX = ".kvc"
LOCK_NAME = ".lock"
# Temporary files this process is writing. NOTE: a file named with our pid and absent here
# is a dead process's (in a container a restarted service often gets the same pid).
_writing: set[str] = set()
_writing_lock = threading.Lock()


class DirFile(NamedTuple):
    mtime: int          # ns; recency across processes (tiers set it when a chunk is used)
    path: str
    size: int
    model: str          # the subdirectory: the model's fingerprint in hex


class ChunkDir:
    """The shared directory `root`: its lock, its files, reservations in it."""

    def __init__(self, root: Path):
        self.root = Path(root)

    @contextmanager
    def locked(self):
        """Hold the directory's lock (blocks while another process or thread holds it)."""
        fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                # NOTE: an explicit unlock: a child forked meanwhile shares this descriptor,
                # and closing our copy alone would leave the lock held by the child's
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def scan(self) -> tuple[list[DirFile], int, int]:
        """(every chunk file under the root, bytes reserved by live writers' temporary
        files, temporary files of dead writers deleted). Under the lock."""
        files, reserved, deleted = [], 0, 0
        try:
            subs = [e for e in os.scandir(self.root) if e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return files, 0, 0
        for sub in subs:
            try:
                entries = list(os.scandir(sub.path))
            except OSError:         # a model directory removed meanwhile
                continue
            for e in entries:       # NOTE: the hot loop of every write: strings, no Paths
                name = e.name
                is_tmp = name.endswith(".tmp")
                if not is_tmp and not name.endswith(SUFFIX):
                    continue
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                if not is_tmp:
                    files.append(DirFile(st.st_mtime_ns, e.path, st.st_size, sub.name))
                elif tmp_writer(name) is None:
                    continue
                elif writer_alive(name):
                    reserved += st.st_size
                else:
                    unlink(Path(e.path))
                    deleted += 1
        return files, reserved, deleted

    @staticmethod
    def reserve(tmp: Path, size: int) -> int:
        """Create temporary file `tmp` at `size` bytes (its reservation); a write fd. Under
        the lock."""
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        with _writing_lock:
            _writing.add(tmp.name)
        try:
            os.ftruncate(fd, size)
        except OSError:
            os.close(fd)
            ChunkDir.done(tmp, remove=True)
            raise
        return fd

    @staticmethod
    def done(tmp: Path, remove: bool = False) -> None:
        """Temporary file `tmp` is renamed (or, with `remove`, abandoned and deleted)."""
        if remove:
            unlink(tmp)
        with _writing_lock:
            _writing.discard(tmp.name)


def tmp_name(stem: str) -> str:
    """A writer's temporary file name for chunk `stem`: ``.STEM.PID.TID.tmp``."""
    return f".{stem}.{os.getpid()}.{threading.get_ident()}.tmp"


def tmp_writer(name: str) -> int | None:
    """The pid in a temporary file's name, None when `name` is not one of ours."""
    parts = name.split(".")
    if len(parts) != 5 or parts[0] or parts[4] != "tmp" or not parts[2].isdigit():
        return None
    return int(parts[2])


def writer_alive(name: str) -> bool:
    """Is the process that named temporary file `name` still running?"""
    pid = tmp_writer(name)
    if pid is None:
        return False
    if pid == os.getpid():
        with _writing_lock:
            return name in _writing
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def unlink(p: Path) -> None:
    try:
        os.unlink(p)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("kv disk tier: cannot delete %s: %s", p, e)


def fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
