"""Run untrusted, model-written Python programs (HumanEval samples) in a sandbox.

Each program runs in its own process tree, started through a small launcher
(``sandbox_launch.py``, run as ``python -I -S -c``) that sets everything up and
then forks and execs ``python -I program.py``. A program passes iff it exits 0.

What is isolated, and how (namespace mode, the normal case on our root VMs):

* ``unshare --net --pid --fork --kill-child --mount-proc`` (plus ``--user
  --map-root-user`` when not root): no network (only a down loopback); the
  program sees only its own processes in /proc, so host processes' environ is
  invisible; killing ``unshare`` kills the launcher, which is pid 1 of the
  namespace, and with it every process the program started (fork bombs and
  double-forked daemons included). The launcher exits as soon as the program's
  main process does, so daemons never outlive the run.
* Private mount namespace: size-limited tmpfs on /tmp, /var/tmp and /dev/shm
  (the program and its cwd live in the new /tmp); every other mount is
  bind-remounted read-only and nosuid (a per-namespace change; the host's
  mounts stay as they are). If the interpreter sits below a directory the
  sandbox uid may not enter (e.g. pyenv under /root), that directory is covered
  by an empty tmpfs and only the interpreter's prefix is bound back into it,
  so the rest of it (keys, credentials) stays hidden.
* As root, the program runs as an unprivileged uid/gid (no supplementary
  groups) that is distinct for every concurrently running program, so
  RLIMIT_NPROC holds per program and other runs' processes cannot be signalled.
  As non-root, in a user namespace, it drops all capabilities instead.
  no_new_privs is set in both cases.
* rlimits: CPU, AS (address space per process), FSIZE, NPROC, NOFILE=64, CORE=0.
* Scrubbed environment (PATH, LANG, HOME only), stdin=/dev/null, fresh session.
* Output goes to a file the parent opened; its size is bounded by RLIMIT_FSIZE,
  and only its tail is read back.
* The parent enforces the wall-clock timeout, kills the whole tree, checks that
  no process of the run's uid is left, and removes its temporary files.

Worst cases per program: memory is bounded by max_processes x memory_bytes of
address space (8 x 1 GiB by default; resident memory is usually far less) plus
3 x tmpfs_bytes of tmpfs pages; disk by file_size_bytes for the output file
(everything else it writes is tmpfs); CPU by max_processes x cpu_s, cut short
by timeout_s of wall time. Multiply by the number of concurrent runs.

Fallback (namespaces not allowed, or ``namespaces=False``; describe() says
"degraded"): rlimits, uid drop (if root), scrubbed env, a host temp dir as cwd
(removed afterwards) and killing the process group, plus, as root, every
process of the run's uid. NOT protected in the fallback: network access; reads
of anything the sandbox uid may read (world-readable files); writes to
world-writable places such as /tmp, /var/tmp and /dev/shm (files left there
are not removed); resource use through the network or other services. If
sys.executable is not readable by the sandbox uid, programs run with the
system's /usr/bin/python3.X of the same version (noted in describe()). As
non-root there is no uid drop: the program runs as the calling user, may
signal (and kill) every process of that user, may read /proc/<pid>/environ of
them, may write wherever the user can, and children that call setsid() can
survive a timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["Execution", "Sandbox", "SandboxLimits"]

OUTPUT_CHARS = 2000
_KILL_GRACE_S = 3.0  # how long we wait for killed processes to be gone
_UNSHARE = "/usr/bin/unshare"
_UID_BASE = 2_000_000_000
_SLOTS = 256  # concurrent runs per host process (the uid range of every pid up to 2**22 stays below 2**32)
_LAUNCHER_SRC = (Path(__file__).with_name("sandbox_launch.py")).read_text()

_KILL_UID_SRC = """
import os, sys
uid = int(sys.argv[1])
os.setgroups([]); os.setgid(uid); os.setuid(uid)
try:
    os.kill(-1, 9)
except ProcessLookupError:
    pass
"""

_PROBE_PROGRAM = """
import json, os, socket
print("PROBE" + json.dumps({
    "uid": os.getuid(),
    "pid": os.getpid(),
    "ifaces": [name for _, name in socket.if_nameindex()],
    "procs": sum(1 for e in os.listdir("/proc") if e.isdigit()),
}))
"""


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0
    cpu_s: int = 10
    memory_bytes: int = 1 << 30
    file_size_bytes: int = 16 << 20
    max_processes: int = 8
    tmpfs_bytes: int = 64 << 20


@dataclass(frozen=True)
class Execution:
    status: str  # "passed" | "failed" | "timeout" | "error"
    returncode: int | None
    output: str
    elapsed_s: float


class _UidPool:
    """Unprivileged uids, one per concurrently running program of this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free = list(range(_SLOTS))
        # Live processes have distinct pids, so two eval runs never share a uid.
        self.first = _UID_BASE + os.getpid() * _SLOTS

    def acquire(self) -> int:
        with self._lock:
            if not self._free:
                raise RuntimeError(f"more than {_SLOTS} concurrent sandbox runs")
            return self.first + self._free.pop(0)

    def release(self, uid: int) -> None:
        with self._lock:
            self._free.append(uid - self.first)


_uid_pool: _UidPool | None = None
_probe_cache: dict[tuple, dict] = {}
_module_lock = threading.Lock()


def _pool() -> _UidPool:
    global _uid_pool
    with _module_lock:
        if _uid_pool is None or _uid_pool.first != _UID_BASE + os.getpid() * _SLOTS:
            _uid_pool = _UidPool()  # new after a fork, too
        return _uid_pool


def _pids_of_uid(uid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def _kill_uid(uid: int) -> bool:
    """Kill every process running as `uid` (we are root). True if none is left."""
    deadline = time.monotonic() + _KILL_GRACE_S
    while True:
        if not _pids_of_uid(uid):
            return True
        if time.monotonic() > deadline:
            return False
        # kill(-1) from a process of that uid is atomic against forks, unlike
        # killing pids one by one while a fork bomb keeps replacing them.
        try:
            subprocess.run([sys.executable, "-I", "-S", "-c", _KILL_UID_SRC, str(uid)],
                           env={"PATH": "/usr/bin:/bin"}, stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           close_fds=True, timeout=_KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        time.sleep(0.02)


def _world_reachable(path: str) -> bool:
    """Could an unrelated uid traverse to `path` and read it?"""
    real = os.path.realpath(path)
    parts = real.strip("/").split("/")
    try:
        for i in range(1, len(parts)):
            if not os.stat("/" + "/".join(parts[:i])).st_mode & 0o001:
                return False
        return bool(os.stat(real).st_mode & 0o004)
    except OSError:
        return False


# What the mount namespace covers: private tmpfs on the scratch places, and an empty one on /run
# (host Unix sockets; a read-only mount still lets a program connect to them). An interpreter below
# any of them, or below the home directory, is bound back into it.
TMPFS_POINTS = ("/tmp", "/var/tmp", "/dev/shm")
HIDDEN_POINTS = ("/run", "/var/run")


def _interpreter(namespaces: bool) -> tuple[str, list[str], list[str]]:
    """(python for the program, paths to expose in the mount namespace, notes)."""
    exe = sys.executable
    if namespaces:
        # A virtual environment under /tmp (a CI checkout) or a pyenv under /root must stay visible.
        paths = sorted({os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix)})
        points = (*TMPFS_POINTS, *HIDDEN_POINTS, os.path.expanduser("~"))
        covered = [p for p in paths if any(p == c or p.startswith(c.rstrip("/") + "/") for c in points)]
        private = [p for p in paths if os.geteuid() == 0 and not _world_reachable(p)]
        return exe, sorted(set(covered + private)), []
    needed = [exe, os.path.join(sys.base_prefix, "lib")]
    if os.geteuid() != 0 or all(_world_reachable(p) for p in needed):
        return exe, [], []
    alt = f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}"
    if _world_reachable(alt):
        return alt, [], [f"{exe} is not readable by the sandbox uid; programs run with {alt}"]
    return exe, [], [f"{exe} is not readable by the sandbox uid"]


def _read_tail(fd: int, chars: int = OUTPUT_CHARS) -> str:
    size = os.fstat(fd).st_size
    start = max(0, size - 4 * chars)
    data = os.pread(fd, size - start, start)
    return data.decode("utf-8", errors="replace")[-chars:]


def _read_status(fd: int) -> list[str]:
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", errors="replace").splitlines()


class Sandbox:
    def __init__(self, limits: SandboxLimits = SandboxLimits(), *, namespaces: bool = True):
        self.limits = limits
        self._root = os.geteuid() == 0
        key = (namespaces, self._root, limits.tmpfs_bytes)
        with _module_lock:
            probe = _probe_cache.get(key)
        if probe is None:
            probe = self._probe(namespaces)
            with _module_lock:
                _probe_cache[key] = probe
        self._probe_result = probe
        self._prefix: list[str] = probe["prefix"]
        self._python, self._expose = probe["python"], probe["expose"]
        self._namespaces = probe["namespaces"]

    # -- probing -------------------------------------------------------------

    def _unshare_prefix(self) -> list[str]:
        user = [] if self._root else ["--user", "--map-root-user"]
        return [_UNSHARE, *user, "--net", "--pid", "--fork", "--kill-child", "--mount-proc"]

    def _probe(self, want_namespaces: bool) -> dict:
        notes: list[str] = []
        if want_namespaces:
            prefix = self._unshare_prefix()
            try:
                ok = subprocess.run([*prefix, "true"], env={"PATH": "/usr/bin:/bin"},
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, timeout=10).returncode == 0
            except (OSError, subprocess.TimeoutExpired) as e:
                ok = False
                notes.append(f"unshare failed: {e}")
            if ok:
                self._python, self._expose, _ = _interpreter(True)
                report = self._probe_run(prefix, True)
                if report is not None:
                    return report
                notes.append("namespace launcher probe failed")
            elif not notes:
                notes.append("unshare not permitted")
        self._python, self._expose, more = _interpreter(False)
        notes += more
        report = self._probe_run([], False)
        if report is None:
            raise RuntimeError("sandbox: even the fallback launcher does not work here")
        report["notes"] = notes + report.get("notes", [])
        return report

    def _probe_run(self, prefix: list[str], namespaces: bool) -> dict | None:
        limits = SandboxLimits(timeout_s=20.0, cpu_s=10, tmpfs_bytes=self.limits.tmpfs_bytes)
        ex, lines = self._execute(_PROBE_PROGRAM, limits, prefix, namespaces, probe=True)
        if ex.status != "passed":
            return None
        found = [ln for ln in ex.output.splitlines() if ln.startswith("PROBE")]
        mounts = [json.loads(ln[6:]) for ln in lines if ln.startswith("probe ")]
        if not found:
            return None
        seen = json.loads(found[-1][len("PROBE"):])
        return {"prefix": prefix, "namespaces": namespaces, "seen": seen,
                "python": self._python, "expose": self._expose,
                "mounts": mounts[0] if mounts else {}, "notes": []}

    # -- public API ----------------------------------------------------------

    def describe(self) -> dict:
        p = self._probe_result
        seen, mounts = p["seen"], p["mounts"]
        isolation: list[str] = []
        if self._namespaces:
            if seen["ifaces"] == ["lo"]:
                isolation.append("net")
            if seen["pid"] <= 3:
                isolation.append("pid")
            isolation.append("mount")
            if not self._root:
                isolation.append("user (no capabilities)")
        if self._root:  # no numbers: the description must not change from one process to the next
            isolation.append("an unprivileged uid per concurrent run")
        if "/" in mounts.get("readonly", []):
            isolation.append("read-only root")
        if mounts.get("tmpfs"):
            isolation.append("private tmpfs " + ",".join(mounts["tmpfs"]))
        isolation += ["rlimits", "scrubbed env", "no_new_privs"]
        not_isolated = []
        if not self._namespaces:
            not_isolated = ["network", "world-writable host dirs (/tmp, /var/tmp, /dev/shm)",
                            "reading world-readable host files"]
            if not self._root:
                not_isolated += ["uid (runs as the calling user)", "signals to the user's processes"]
        return {
            "mode": "namespaces" if self._namespaces else "fallback",
            "degraded": not self._namespaces,
            "isolation": isolation,
            "not_isolated": not_isolated,
            "readonly_mounts": mounts.get("readonly", []),
            "readonly_failed": mounts.get("readonly_failed", []),
            "notes": p.get("notes", []),
            "limits": asdict(self.limits),
            "python": self._python,
            "hidden": mounts.get("hidden", []),
        }

    def _hide_points(self) -> list[str]:
        """Host places to cover with an empty tmpfs: HIDDEN_POINTS, and the home of a non-root
        caller (its keys and tokens are readable to the namespace's root, which is it)."""
        points = list(HIDDEN_POINTS)
        home = os.path.expanduser("~")
        if not self._root and home not in ("/", "") and os.path.isdir(home):
            points.append(home)
        return points

    def run(self, program: str) -> Execution:
        return self._execute(program, self.limits, self._prefix, self._namespaces)[0]

    # -- the work ------------------------------------------------------------

    def _execute(self, program: str, limits: SandboxLimits, prefix: list[str],
                 namespaces: bool, probe: bool = False) -> tuple[Execution, list[str]]:
        start = time.monotonic()
        uid = base = out_fd = status_r = status_w = proc = None
        timed_out = False
        lines: list[str] = []
        try:
            uid = _pool().acquire() if self._root else None
            base = tempfile.mkdtemp(prefix="pixtral-sandbox-")
            os.chmod(base, 0o711)  # the fallback's workdir below must be reachable
            out_fd = os.open(os.path.join(base, "output"), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            workdir = os.path.join(base, "work")
            if not namespaces:
                os.mkdir(workdir, 0o700)
            status_r, status_w = os.pipe()
            cfg = {
                "status_fd": status_w,
                "namespaces": namespaces,
                "probe": probe,
                "workdir": workdir,
                "tmpfs_bytes": limits.tmpfs_bytes,
                "python": self._python,
                "expose": self._expose,
                "tmpfs_points": list(TMPFS_POINTS),
                "hide": self._hide_points(),
                "uid": uid,
                "gid": uid,
                "drop_caps": namespaces and not self._root,
                "rlimits": {
                    "RLIMIT_CPU": int(limits.cpu_s),
                    "RLIMIT_AS": int(limits.memory_bytes),
                    "RLIMIT_FSIZE": int(limits.file_size_bytes),
                    "RLIMIT_NPROC": int(limits.max_processes),
                    "RLIMIT_NOFILE": 64,
                    "RLIMIT_CORE": 0,
                },
            }
            cmd = [*prefix, sys.executable, "-I", "-S", "-c", _LAUNCHER_SRC, json.dumps(cfg)]
            proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=out_fd, stderr=out_fd, cwd="/",
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, close_fds=True,
                pass_fds=(status_w,), start_new_session=True)
            os.close(status_w)
            status_w = None
            try:
                proc.communicate(program.encode("utf-8", errors="surrogateescape"),
                                 timeout=max(0.0, limits.timeout_s - (time.monotonic() - start)))
            except subprocess.TimeoutExpired:
                timed_out = True
            elapsed = time.monotonic() - start
        except Exception as e:  # noqa: BLE001 - the sandbox itself failed
            elapsed = time.monotonic() - start
            return Execution("error", None, f"sandbox error: {e!r}"[-OUTPUT_CHARS:], elapsed), lines
        finally:
            leftover = self._cleanup(proc, uid)
            if status_r is not None:
                lines = _read_status(status_r) if proc is not None else []
                os.close(status_r)
            if status_w is not None:
                os.close(status_w)
            output = _read_tail(out_fd) if out_fd is not None else ""
            if out_fd is not None:
                os.close(out_fd)
            if base is not None:
                shutil.rmtree(base, ignore_errors=True)
            if uid is not None and leftover:
                _pool().release(uid)
        return self._classify(proc, lines, timed_out, output, elapsed), lines

    def _cleanup(self, proc: subprocess.Popen | None, uid: int | None) -> bool:
        """Kill whatever the run left; True if nothing of it survives."""
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(timeout=_KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
            if proc.stdin is not None:
                try:
                    proc.stdin.close()
                except OSError:
                    pass
        if uid is not None:
            # A uid with live processes is never handed out again (it would
            # share their RLIMIT_NPROC count and could signal them).
            return _kill_uid(uid)
        return True

    @staticmethod
    def _classify(proc, lines: list[str], timed_out: bool, output: str, elapsed: float) -> Execution:
        errors = [ln[6:] for ln in lines if ln.startswith("error ")]
        exits = [ln for ln in lines if ln.startswith("exit ")]
        if timed_out:
            return Execution("timeout", None, output, elapsed)
        if errors:
            msg = "sandbox error: " + "; ".join(errors)
            return Execution("error", None, (output + "\n" + msg)[-OUTPUT_CHARS:], elapsed)
        if exits:
            rc = os.waitstatus_to_exitcode(int(exits[-1].split()[1]))
        elif "ok" in lines and proc is not None and proc.returncode is not None:
            rc = proc.returncode  # the launcher itself was killed
        else:
            msg = f"sandbox error: launcher did not start (exit {proc.returncode if proc else None})"
            return Execution("error", None, (output + "\n" + msg)[-OUTPUT_CHARS:], elapsed)
        return Execution("passed" if rc == 0 else "failed", rc, output, elapsed)
