"""One training run per output folder: `OutputDirLock` holds `output_dir/.training.lock` for the lifetime of a run,
so a second run started into the same folder is refused instead of interleaving its checkpoints and pipeline with
the first. A lock left by a killed run (its process is gone) is taken over with a warning.

Neither Accelerate nor `filelock` covers this: a `filelock` lock disappears with its process, so it cannot tell the
user *which* run holds the folder, and Accelerate's `ProjectConfiguration` has no notion of ownership.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import time
from pathlib import Path

logger = logging.getLogger(__name__)

LOCK_NAME = ".training.lock"


def _process_start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (Linux `/proc`), which tells a live run from a new process that reused its
    PID; None where there is no `/proc`."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _is_running(holder: dict) -> bool:
    """Whether the process recorded in a lock on this host is still the one that took it."""
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    recorded = holder.get("start_time")
    return recorded is None or _process_start_time(pid) in (None, recorded)


class OutputDirLock:
    """Exclusive ownership of a run's output folder by this process (`acquire`, `release`; released at exit)."""

    def __init__(self, output_dir: str | os.PathLike):
        self.path = Path(output_dir) / LOCK_NAME
        self.held = False

    def _holder(self) -> dict:
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "start_time": _process_start_time(os.getpid()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }

    def acquire(self) -> None:
        """Take the lock, or take over a stale one; `SystemExit` naming the holder if another run is alive."""
        holder = self._holder()
        tmp = self.path.with_name(f"{LOCK_NAME}.{holder['pid']}.tmp")
        tmp.write_text(json.dumps(holder))
        try:
            while True:
                try:
                    os.link(tmp, self.path)  # atomic: fails if the lock exists, and the lock is never half-written
                    break
                except FileExistsError:
                    self._take_over_if_stale(holder)
        finally:
            tmp.unlink(missing_ok=True)
        self.held = True
        atexit.register(self.release)

    def _take_over_if_stale(self, me: dict) -> None:
        try:
            other = json.loads(self.path.read_text())
        except FileNotFoundError:
            return  # released meanwhile: try again
        except (OSError, json.JSONDecodeError):
            other = {}
        same_host = other.get("host") == me["host"]
        if other.get("pid") == me["pid"] and same_host:
            logger.info(f"Reusing {self.path} left by an earlier run in this process.")
        elif other and not same_host:
            raise SystemExit(
                f"{self.path.parent} is in use by a run on host {other.get('host')} (pid {other.get('pid')}, started "
                f"{other.get('started')}). Use another --output_dir, or delete {self.path} if that run is over."
            )
        elif _is_running(other):
            raise SystemExit(
                f"{self.path.parent} is in use by another training run (pid {other['pid']}, started "
                f"{other.get('started')}): wait for it to end or use another --output_dir."
            )
        else:
            logger.warning(
                f"Taking over {self.path}: the run that held it (pid {other.get('pid', '?')}) is no longer running."
            )
        self.path.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
