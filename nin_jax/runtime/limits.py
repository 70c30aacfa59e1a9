"""Whether the limits a process runs under leave JAX's runtime room to start: its address space
(`ulimit -v`) and the threads it may start (`ulimit -u`, which binds users other than root, and
the `pids.max` of its cgroup and those above it, as containers set them). Below them XLA aborts
with a C++ stack trace where it cannot map a library or start a thread. This module imports
nothing of JAX's, so that it runs before JAX does."""

import os
import resource
from typing import Iterator, Optional

# A small train.py run on a 2-core CPU (docs/failure_behaviour.md): `ulimit -v` 5.5 GB ran, at 5 GB
# a thread could not start, at 4 GB an array could not be allocated, below 3.5 GB XLA aborted.
MIN_ADDRESS_SPACE_GIB = 6
# The same run's threads at their most: 29 on 1 core, 35 on 2 (XLA's pools grow with the cores).
THREADS_BASE, THREADS_PER_CORE = 24, 6
_CGROUP_ROOTS = {"pids": ("/sys/fs/cgroup/pids",), "": ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")}


def too_low() -> str:
    """Why a limit of this process is too low for JAX's runtime, or '' where none is."""
    return _address_space() or _threads()


def _address_space() -> str:
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit == resource.RLIM_INFINITY or limit >= MIN_ADDRESS_SPACE_GIB * 2**30:
        return ""
    return (f"the address space is limited to {limit / 2**30:.1f} GiB (ulimit -v {limit // 1024}), and JAX's "
            f"runtime needs at least {MIN_ADDRESS_SPACE_GIB} GiB of it: raise the limit (ulimit -v unlimited)")


def _threads() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # macOS
    needed = THREADS_BASE + THREADS_PER_CORE * cores
    room = min((room for room in (_room_under_ulimit(), *_rooms_under_cgroups()) if room is not None), default=None)
    if room is None or room >= needed:
        return ""
    return (f"this process may start only {max(room, 0)} more threads (ulimit -u, or its cgroup's pids.max), and "
            f"JAX's runtime needs {needed} on {cores} cores: raise the limit, or end other processes of this user")


def _room_under_ulimit() -> Optional[int]:
    """How many more threads `ulimit -u` lets this user start; None where it does not bind (root)
    or where there is no /proc to count them in (macOS)."""
    limit = resource.getrlimit(resource.RLIMIT_NPROC)[0]
    if limit == resource.RLIM_INFINITY or os.geteuid() == 0 or not os.path.isdir("/proc"):
        return None
    return limit - sum(_threads_of(pid) for pid in os.listdir("/proc") if pid.isdigit() and _owner(pid) == os.getuid())


def _owner(pid: str) -> Optional[int]:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:  # it ended meanwhile
        return None


def _threads_of(pid: str) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return 0


def _rooms_under_cgroups() -> Iterator[int]:
    """How many more tasks the `pids.max` of this process's cgroup allows, and of each above it."""
    try:
        with open("/proc/self/cgroup") as memberships:
            lines = memberships.read().splitlines()
    except OSError:
        return
    for line in lines:
        _, controllers, path = line.split(":", 2)
        for root in _CGROUP_ROOTS.get("pids" if "pids" in controllers.split(",") else controllers, ()):
            folder = os.path.join(root, path.lstrip("/"))
            while folder.startswith(root) and folder != root:
                room = _room_in(folder)
                if room is not None:
                    yield room
                folder = os.path.dirname(folder)


def _room_in(folder: str) -> Optional[int]:
    try:
        with open(os.path.join(folder, "pids.max")) as maximum, open(os.path.join(folder, "pids.current")) as current:
            limit, used = maximum.read().strip(), int(current.read())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else int(limit) - used
