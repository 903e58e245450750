"""The workdir lock: one run per workdir at a time, and no lock outlives its process.

  with lock.locked(workdir):   # WorkdirBusyError at once if another live run holds it
    ...                        # the whole run

An OS-level lock (`fcntl.flock`) on `<workdir>/.lock`, which also records the holder's pid, host
and start time for the refusal message. The kernel releases a flock when its process exits or is
killed, so a stale lock file never blocks a rerun. On a multi-host run only process 0 takes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
import socket
import time
from collections.abc import Iterator

from ilr_jax.workdir import WorkdirError


class WorkdirBusyError(WorkdirError):
  """Another live process holds the workdir's lock."""


@contextlib.contextmanager
def locked(root: str | os.PathLike) -> Iterator[None]:
  """Hold `<root>/.lock` (fcntl.flock, exclusive) for the duration; records pid and host in it.

  A second holder is refused at once with WorkdirBusyError naming the first one's pid and host.
  The kernel drops the lock when its process dies, however it dies, so a lock file left behind by
  a killed run never blocks. The file itself stays (deleting it would let two runs lock two
  different files of one name).
  """
  root = pathlib.Path(root)
  root.mkdir(parents=True, exist_ok=True)
  path = root / '.lock'
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = os.pread(fd, 4096, 0).decode(errors='replace')
    os.close(fd)
    try:
      info = json.loads(holder)
      who = f'pid {info["pid"]} on host {info["host"]} (since {info["since"]})'
    except (ValueError, KeyError, TypeError):
      who = 'a process that has not written its pid yet'
    raise WorkdirBusyError(
      f'workdir {root} is in use by another run: {who}; wait for it to finish, or use another '
      '--workdir'
    ) from None
  try:
    info = {'pid': os.getpid(), 'host': socket.gethostname(), 'since': time.strftime('%H:%M:%S')}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    yield
  finally:
    os.close(fd)  # releases the flock
