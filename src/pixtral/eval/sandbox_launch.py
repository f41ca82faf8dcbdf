"""Launcher for one sandboxed program (see pixtral.eval.sandbox).

Run by the parent as ``python -I -S -c <this file's source> <config json>``, as
root or the invoking user, possibly inside fresh namespaces made by `unshare`.
It must only use the standard library: it is never imported as part of the package.

Protocol: the program text arrives on stdin; the parent passes a pipe as fd
``cfg["status_fd"]``; this launcher writes one line per event to it:
``ok`` (setup done), ``error <text>`` (the sandbox could not run the program),
``exit <wait status>`` (the program's own wait status), ``probe <json>``.
The program never holds that pipe, so it cannot forge these lines.
"""

import ctypes
import json
import os
import resource
import sys

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MNT_DETACH = 2
MS_RELATIME = 1 << 21
PR_SET_NO_NEW_PRIVS = 38
PR_SET_CHILD_SUBREAPER = 36
PR_CAPBSET_DROP = 24
PR_SET_SECUREBITS = 28
# NOROOT and NO_SETUID_FIXUP on, KEEP_CAPS off; all three locked.
SECUREBITS_LOCKED_NOROOT = 0x2F

_FLAG_OPTS = {
    "ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME, "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME,
}

_libc = ctypes.CDLL(None, use_errno=True)


def _mount(source, target, fstype, flags, data):
    enc = (lambda s: None if s is None else s.encode())
    if _libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def _unescape(path):
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(path):
        if path[i] == "\\" and i + 3 < len(path) and path[i + 1:i + 4].isdigit():
            out.append(chr(int(path[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(path[i])
            i += 1
    return "".join(out)


def _mounts():
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            yield _unescape(fields[4]), fields[5].split(",")


def _blocked_ancestor(path):
    """Topmost ancestor directory of `path` that others may not traverse."""
    parts = path.strip("/").split("/")
    for i in range(1, len(parts)):
        anc = "/" + "/".join(parts[:i])
        if not os.stat(anc).st_mode & 0o001:
            return anc
    return None


def _under(path, points):
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in points)


def expose(paths, tmpfs_points):
    """Make `paths` reachable for the unprivileged uid when an ancestor is private
    (e.g. an interpreter under /root): cover that ancestor with an empty tmpfs
    and bind only `paths` back into it. The rest of the ancestor stays hidden.
    Paths below the private tmpfs points are bound back by `setup_mounts`."""
    plan = [(p, _blocked_ancestor(p)) for p in paths if not _under(p, tmpfs_points)]
    plan = [(p, anc) for p, anc in plan if anc is not None]
    staged = []
    for i, (p, _) in enumerate(plan):
        stage = "/tmp/.expose%d" % i
        os.mkdir(stage, 0o700)
        _mount(p, stage, None, MS_BIND | MS_REC, None)
        staged.append(stage)
    covered = set()
    for (p, anc), stage in zip(plan, staged):
        if anc not in covered:
            _mount("tmpfs", anc, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
            covered.add(anc)
        os.makedirs(p, 0o755, exist_ok=True)
        _mount(stage, p, None, MS_BIND | MS_REC, None)
        _libc.umount2(stage.encode(), MNT_DETACH)
        os.rmdir(stage)
    return ["%s (only %s)" % (anc, p) for p, anc in plan]


def hide(points, keep):
    """Cover `points` with empty tmpfs: /run holds host Unix sockets (a read-only mount still lets
    a program connect to them), and a non-root caller's home its keys and tokens. A point that
    holds the interpreter (in `keep`) gets it bound back, as `expose` does."""
    hidden = []
    for point in points:
        if not os.path.isdir(point) or os.path.islink(point):
            continue
        inside = [p for p in keep if p == point or p.startswith(point.rstrip("/") + "/")]
        staged = []
        for i, p in enumerate(inside):
            stage = "/tmp/.keep%d" % i
            os.mkdir(stage, 0o700)
            _mount(p, stage, None, MS_BIND | MS_REC, None)
            staged.append((p, stage))
        _mount("tmpfs", point, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
        for p, stage in staged:
            os.makedirs(p, 0o755, exist_ok=True)
            _mount(stage, p, None, MS_BIND | MS_REC, None)
            _libc.umount2(stage.encode(), MNT_DETACH)
            os.rmdir(stage)
        hidden.append(point + (" (only %s)" % ", ".join(inside) if inside else ""))
    return hidden


def setup_mounts(tmpfs_bytes, tmpfs_points, expose_paths, hide_points):
    """Private tmpfs on the writable scratch places, hidden host sockets and home, everything
    else read-only."""
    held = {"tmpfs": [], "readonly": [], "readonly_failed": []}
    # An interpreter below a point about to be covered (a virtual environment in /tmp) is held
    # open now and bound back afterwards through its /proc/self/fd link.
    kept = {p: os.open(p, os.O_PATH | os.O_DIRECTORY) for p in expose_paths
            if _under(p, tmpfs_points) and os.path.isdir(p)}
    for point in tmpfs_points:
        if not os.path.isdir(point):
            continue
        _mount("tmpfs", point, "tmpfs", MS_NOSUID | MS_NODEV,
               "size=%d,mode=1777" % tmpfs_bytes)
        held["tmpfs"].append(point)
    for path, fd in kept.items():
        os.makedirs(path, 0o755, exist_ok=True)
        _mount("/proc/self/fd/%d" % fd, path, None, MS_BIND | MS_REC, None)
        os.close(fd)
    held["hidden"] = expose(expose_paths, tmpfs_points) + hide(hide_points, expose_paths)
    seen = set()
    for point, opts in list(_mounts()):
        if point in seen or point in tmpfs_points:
            continue
        seen.add(point)
        flags = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID
        for opt in opts:
            flags |= _FLAG_OPTS.get(opt, 0)
        try:
            # MS_BIND makes this a per-mount (this namespace only) change, never the
            # superblock's, so the host's view of the filesystem stays writable.
            _mount(None, point, None, flags, None)
            held["readonly"].append(point)
        except OSError as e:
            held["readonly_failed"].append("%s (%s)" % (point, e.strerror))
    return held


def _report(fd, line):
    os.write(fd, (line.replace("\n", " ") + "\n").encode())


def _child(cfg, status_fd, prog_path, workdir):
    """In the forked child: limits, privilege drop, exec. Never returns."""
    try:
        limits = cfg["rlimits"]
        for name, value in limits.items():
            res = getattr(resource, name)
            hard = value + 1 if name == "RLIMIT_CPU" else value  # SIGXCPU first, SIGKILL 1 s later
            resource.setrlimit(res, (value, hard))
        uid, gid = cfg.get("uid"), cfg.get("gid")
        if uid is not None:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            if os.getuid() != uid or os.geteuid() != uid:
                raise RuntimeError("uid drop did not hold")
        elif cfg.get("drop_caps"):
            _drop_capabilities()
        # Keeps setuid binaries (su, sudo, ...) from granting anything back.
        _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        os.chdir(workdir)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir}
        python = cfg["python"]
        os.execve(python, [python, "-I", prog_path], env)
    except BaseException as e:  # noqa: BLE001 - anything here means the sandbox failed
        try:
            _report(status_fd, "error child setup: %r" % (e,))
        finally:
            os._exit(127)


def _drop_capabilities():
    """As root of a user namespace (no uid to drop to): give up every capability
    for good, so the program cannot undo the read-only remounts."""
    if _libc.prctl(PR_SET_SECUREBITS, SECUREBITS_LOCKED_NOROOT, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_SECUREBITS")
    for cap in range(64):
        _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    data = (ctypes.c_uint32 * 6)()  # two all-zero __user_cap_data_struct
    if _libc.capset(ctypes.byref(Header(0x20080522, 0)), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def main():
    cfg = json.loads(sys.argv[1])
    status_fd = cfg["status_fd"]
    os.set_inheritable(status_fd, False)
    try:
        program = sys.stdin.buffer.read()
        devnull = os.open("/dev/null", os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)

        probe = {}
        if cfg["namespaces"]:
            probe.update(setup_mounts(cfg["tmpfs_bytes"], cfg["tmpfs_points"], cfg["expose"], cfg["hide"]))
            workdir = "/tmp/work"
            os.mkdir(workdir, 0o700)
        else:
            workdir = cfg["workdir"]
            # Orphans of the program reparent to us, so we can kill them at the end.
            _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        prog_path = os.path.join(workdir, "program.py")
        with open(prog_path, "wb") as f:
            f.write(program)
        if cfg.get("uid") is not None:
            os.chown(workdir, cfg["uid"], cfg["gid"])
            os.chown(prog_path, cfg["uid"], cfg["gid"])
    except BaseException as e:  # noqa: BLE001
        _report(status_fd, "error launcher setup: %r" % (e,))
        os._exit(127)

    if cfg.get("probe"):
        _report(status_fd, "probe " + json.dumps(probe))
    _report(status_fd, "ok")
    pid = os.fork()
    if pid == 0:
        _child(cfg, status_fd, prog_path, workdir)
    status = None
    while True:
        # As pid 1 of the namespace (or a subreaper) we also reap orphans.
        try:
            got, st = os.wait()
        except ChildProcessError:
            break
        if got == pid:
            status = st
            break
    _report(status_fd, "exit %d" % status if status is not None else "error lost the program's status")
    if not cfg["namespaces"]:
        _kill_descendants()
    os._exit(0)


def _kill_descendants():
    """Fallback only: kill every process reparented to us, until none is left."""
    me = str(os.getpid())
    for _ in range(1000):
        children = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open("/proc/%s/stat" % entry) as f:
                    stat = f.read()
            except OSError:
                continue
            if stat.rsplit(")", 1)[1].split()[1] == me:
                children.append(int(entry))
        if not children:
            return
        for child in children:
            try:
                os.kill(child, 9)
            except OSError:
                pass
        for child in children:
            try:
                os.waitpid(child, 0)
            except ChildProcessError:
                pass


if __name__ == "__main__":
    main()
