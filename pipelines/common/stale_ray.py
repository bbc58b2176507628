"""What a dead driver's local Ray leaves behind, found and stopped by the next run.

A command that starts a local Ray (``ray.init(address="local")``: ``step run``, ``step
tune``) is that Ray's driver. When the driver is killed (``kill -9`` of its process alone,
an OOM kill), Ray's GCS and raylet go with it, but some of its processes do not: measured
with Ray 2.60, ``ray::DashboardAgent`` and ``ray::RuntimeEnvAgent`` (reparented to init)
were still alive minutes later, holding memory and ports.

Each run records its driver (:func:`driver_record`: host, pid, start time) where the next
run of the same work looks (the pipeline's state file, the search's Tune folder). The next
run calls :func:`stop_dead_session` with that record. What it stops, and nothing else:

* only when the recorded driver is gone (no process with its pid and start time), on this
  host;
* only the Ray sessions that driver started: Ray names a local session's folder after its
  driver's pid (``<ray temp>/session_<date>_<time>_<pid>``), created after the driver
  started;
* only processes that name such a folder on their command line or hold a file open in it
  (the agents' logs). Another Ray on the machine, live or not, has its own folder.

It sends SIGTERM, then SIGKILL to what is left after a few seconds (the agents were seen to
outlive SIGTERM), and says what it stopped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _start_ticks(pid: int) -> int | None:
    """The process's start time (clock ticks after boot), None when there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def driver_record() -> dict[str, Any]:
    """This process as the driver of any local Ray it starts."""
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "start_ticks": _start_ticks(os.getpid()), "time": time.time()}


def ray_temp_dir() -> Path:
    """Where a local Ray puts its sessions: Ray 2.60's rule
    (``ray._common.utils.get_default_ray_temp_dir``), without importing Ray."""
    base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return Path(base) / "ray"


def _alive(record: dict[str, Any]) -> bool:
    ticks = _start_ticks(int(record["pid"]))
    return ticks is not None and ticks == record.get("start_ticks")


def _sessions(record: dict[str, Any]) -> list[Path]:
    root = ray_temp_dir()
    found = []
    for path in root.glob(f"session_*_{int(record['pid'])}"):
        with contextlib.suppress(OSError):
            # a later process with the same pid may have started a session too
            if path.is_dir() and not path.is_symlink() and \
                    path.stat().st_mtime >= float(record.get("time", 0)) - 5:
                found.append(path)
    return found


def _uses(pid: int, folders: list[str]) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return False
    if any(f in cmdline for f in folders):
        return True
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if any(target.startswith(f + "/") for f in folders):
                    return True
    return False


def session_processes(sessions: list[Path]) -> list[int]:
    """Live processes that belong to these Ray sessions (see the module docstring)."""
    folders = [str(s) for s in sessions]
    me = os.getpid()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != me and _uses(int(entry.name), folders):
            pids.append(int(entry.name))
    return sorted(pids)


def stop_dead_session(record: dict[str, Any] | None,
                      echo: Callable[[str], None] = print, grace: float = 5.0) -> list[int]:
    """Stop what the dead driver of ``record`` left of its local Ray; the pids stopped.
    Returns when they are gone: a process may still start from a dying raylet, or take a
    moment to die after SIGKILL on a loaded machine, so the sessions are scanned again."""
    if not record or record.get("host") != socket.gethostname() or _alive(record):
        return []
    sessions = _sessions(record)
    stopped: list[int] = []
    for _ in range(3):
        pids = session_processes(sessions) if sessions else []
        if not pids:
            break
        if not stopped:
            echo(f"stopping {len(pids)} process(es) left by the local Ray of a run that died "
                 f"(pid {record['pid']}; {', '.join(s.name for s in sessions)})")
        _stop(pids, grace)
        stopped += [p for p in pids if p not in stopped]
    return stopped


def _stop(pids: list[int], grace: float) -> None:
    """SIGTERM, then SIGKILL to what is left after ``grace`` seconds; wait until gone."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_running(p) for p in pids):
        time.sleep(0.2)
    for pid in pids:
        if _running(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_running(p) for p in pids):
        time.sleep(0.1)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
