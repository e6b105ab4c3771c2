"""Safe files: atomic writes (a reader sees the old file or the new one, never half of one) and an
exclusive workdir lock that names its holder."""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import tempfile
from pathlib import Path


def default_cache_dir() -> Path:
  """famjax's cache (token files, compiled programs): $FAMJAX_CACHE, else ~/.cache/famjax."""
  return Path(os.environ.get("FAMJAX_CACHE", Path.home() / ".cache" / "famjax"))


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def atomic_write_text(path: str | Path, text: str) -> None:
  """Writes `text` to a temporary file beside `path` and renames it into place; the file gets the
  user's normal permissions (0666 less the umask), and a failed write leaves no temporary file."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


class WorkdirBusy(RuntimeError):
  """Another process holds the workdir's lock."""

  def __init__(self, workdir: Path, holder: str):
    super().__init__(f"workdir {workdir} is in use by {holder}; wait for it to finish, stop it, "
                     "or use another workdir")
    self.workdir, self.holder = workdir, holder


_HELD: set[str] = set()  # lock files this process holds (POSIX locks do not exclude a process
#                          from itself)


class WorkdirLock:
  """An exclusive lock on WORKDIR/LOCK_NAME, released on `release` or when the process dies.

  It is an flock(2) lock, which Linux's NFS client maps onto NFS byte-range locks, so it also
  excludes processes on other hosts that share the filesystem. The file holds who took the lock
  (host, pid, time), which a refused process reports.
  """

  name = "lock"

  def __init__(self, workdir: str | Path):
    self.workdir = Path(workdir)
    self.path = self.workdir / self.name
    self._fd: int | None = None

  def acquire(self) -> "WorkdirLock":
    key = str(self.path.resolve())
    self.workdir.mkdir(parents=True, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
      if key in _HELD:
        raise BlockingIOError
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise WorkdirBusy(self.workdir, self.holder()) from None
    holder = {"host": socket.gethostname(), "pid": os.getpid(),
              "since": datetime.datetime.now().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    self._fd = fd
    _HELD.add(key)
    return self

  def holder(self) -> str:
    try:
      info = json.loads(self.path.read_text() or "{}")
      return f"process {info['pid']} on host {info['host']} (since {info['since']})"
    except (OSError, ValueError, KeyError):
      return "another process (it has not written its name yet)"

  def release(self) -> None:
    if self._fd is not None:
      _HELD.discard(str(self.path.resolve()))
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
