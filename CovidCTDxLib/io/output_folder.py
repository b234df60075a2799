"""Where results go: checked before any work, locked against a second run, filled atomically.

Why: a run that fails while writing (read-only folder, full disk, a second run writing the
same folder, a SIGKILL) must neither leave half a result nor destroy the previous one, and
it must say so before the minutes of work, not after. :class:`OutputFolder`:

1. refuses a path that is an existing file;
2. removes staging folders left by runs that were killed (their owner PID is gone);
3. locks the folder: a second run into it is refused while the first holds the lock (the
   kernel releases it when its process dies, so a killed run never blocks later ones);
4. creates the hidden staging folder ``.covidctdx-staging-<pid>-<random>`` beside the
   output (same file system, so moving files into place is a rename) and writes a probe
   file into it and into the output folder, so "read-only" or "disk full" is found first;
5. on :meth:`commit`, renames the staging folder into place (new output folder) or each
   file into the existing one; any failure raises :class:`OutputError` with one line.
"""
from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
from pathlib import Path
from types import TracebackType
from typing import Dict, Iterable, Optional, Type, Union

from ..errors import OutputError

log = logging.getLogger(__name__)

STAGING_PREFIX = ".covidctdx-staging-"
LOCK_PREFIX = ".covidctdx-lock-"
PROBE_NAME = ".covidctdx-probe"
#: Bytes written by the probe: enough to need a data block, so a full disk fails here.
PROBE_BYTES = 64 * 1024
_STAGING_PID = re.compile(re.escape(STAGING_PREFIX) + r"(\d+)-")

PathLike = Union[str, os.PathLike]


def _pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists (conservatively True where it cannot be asked)."""
    if pid == os.getpid():
        return True
    if os.name != "posix":
        return True  # os.kill(pid, 0) would terminate the process on Windows
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def _try_lock(fd: int) -> bool:
    """Non-blocking exclusive lock on an open file; released by the kernel when its process dies."""
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
    except BlockingIOError:
        return False
    return True


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def remove_stale_staging(folder: Path) -> None:
    """Delete ``.covidctdx-staging-<pid>-*`` folders in ``folder`` whose owner process is gone."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for entry in entries:
        match = _STAGING_PID.match(entry.name)
        if match and entry.is_dir() and not _pid_alive(int(match.group(1))):
            log.info("removing %s, left by a run that was killed", entry)
            shutil.rmtree(entry, ignore_errors=True)


class OutputFolder:
    """An output folder opened for one run: checked, locked, with a staging folder to write into.

    Use as a context manager around the whole job (reading, pipeline, writing), so the checks
    and the lock come before any expensive work; leaving it removes the staging folder and
    releases the lock, whatever happened.
    """

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path).absolute()
        self.staging: Optional[Path] = None
        self._lock_fd: Optional[int] = None
        self._lock_path: Optional[Path] = None

    # ----------------------------------------------------------------- open / close
    def __enter__(self) -> "OutputFolder":
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        self.close()

    def _open(self) -> None:
        path = self.path
        if path.exists() and not path.is_dir():
            raise OutputError(f"{path} exists and is a file; the output must be a folder. Choose another -o.")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"Cannot create the output folder's parent {path.parent}: {_reason(exc)}.") from None
        # The staging folder must be on the output's file system so that moving files is a rename.
        root = path.parent
        if path.is_dir() and os.stat(path).st_dev != os.stat(root).st_dev:
            root = path
        for folder in {root, path}:
            if folder.is_dir():
                remove_stale_staging(folder)
        self._lock(root / f"{LOCK_PREFIX}{path.name}")
        self.staging = root / f"{STAGING_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            self.staging.mkdir()
        except OSError as exc:
            self.staging = None
            raise OutputError(f"Cannot write into {root}: {_reason(exc)}. Choose a writable -o.") from None
        self._probe(self.staging)
        if path.is_dir():
            self._probe(path)

    def _lock(self, lock_path: Path) -> None:
        while True:
            try:
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise OutputError(f"Cannot write into {lock_path.parent}: {_reason(exc)}. Choose a writable -o.") from None
            if not _try_lock(fd):
                owner = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise OutputError(
                    f"{self.path} is being written by another covidctdx run (PID {owner}); "
                    "wait for it to finish or choose another -o."
                )
            try:
                same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the previous holder removed the file between our open and lock: retry
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd, self._lock_path = fd, lock_path

    def _probe(self, folder: Path) -> None:
        """Write and remove a file: a read-only or full file system fails here, before any work."""
        probe = folder / PROBE_NAME
        try:
            with open(probe, "wb") as f:
                f.write(b"\0" * PROBE_BYTES)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise OutputError(f"Cannot write into {folder}: {_reason(exc)}. Choose another -o.") from None
        finally:
            probe.unlink(missing_ok=True)

    def close(self) -> None:
        """Remove the staging folder (if not committed) and release the lock."""
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None
        if self._lock_fd is not None and self._lock_path is not None:
            try:
                if os.stat(self._lock_path).st_ino == os.fstat(self._lock_fd).st_ino:
                    self._lock_path.unlink()
            except OSError:
                pass  # already gone or not removable: the next run reuses it
            os.close(self._lock_fd)
            self._lock_fd = None

    # ----------------------------------------------------------------- commit
    def staged(self, name: str) -> Path:
        """Where to write output file ``name`` before :meth:`commit`."""
        if self.staging is None:
            raise RuntimeError("OutputFolder is not open")
        return self.staging / name

    def commit(self, names: Iterable[str], remove: Iterable[str] = ()) -> Dict[str, Path]:
        """Move the staged files ``names`` into the output folder; delete ``remove`` from it.

        ``remove`` lists files of a previous run that this run's results replace (so they
        cannot pass for this run's); nothing else in the folder is touched.
        """
        names = list(names)
        if self.staging is None:
            raise RuntimeError("OutputFolder is not open")
        try:
            if not self.path.exists():
                os.rename(self.staging, self.path)
                self.staging = None
            else:
                for name in names:
                    os.replace(self.staging / name, self.path / name)
                for name in set(remove) - set(names):
                    (self.path / name).unlink(missing_ok=True)
        except OSError as exc:
            raise OutputError(f"Cannot move the results into {self.path}: {_reason(exc)}.") from None
        return {name: self.path / name for name in names}
