"""The HumanEval sandbox against hostile programs: real processes, no mocks."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pixtral.eval.sandbox import Sandbox, SandboxLimits, _pool

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")

LIMITS = SandboxLimits(timeout_s=3.0, cpu_s=6, memory_bytes=512 << 20, max_processes=8,
                       tmpfs_bytes=16 << 20)
MARGIN_S = 3.0
REPO = Path(__file__).resolve().parents[2]
ROOT = os.geteuid() == 0


@pytest.fixture(scope="module", params=[True, False], ids=["namespaces", "fallback"])
def sandbox(request):
    return Sandbox(LIMITS, namespaces=request.param)


def is_isolated(sb: Sandbox) -> bool:
    return not sb.describe()["degraded"]


def sandbox_pids() -> list[int]:
    """Processes still running as one of this process's sandbox uids."""
    first = _pool().first
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                st = os.stat(f"/proc/{entry}")
            except OSError:
                continue
            if first <= st.st_uid < first + 1024:
                found.append(int(entry))
    return found


def run(sb: Sandbox, program: str):
    t0 = time.monotonic()
    try:
        ex = sb.run(program)
    finally:
        assert time.monotonic() - t0 < LIMITS.timeout_s + MARGIN_S
        if ROOT:
            assert sandbox_pids() == []
    assert len(ex.output) <= 2000
    return ex


def host_is_healthy():
    assert subprocess.run(["true"], timeout=10).returncode == 0


# -- honest programs -----------------------------------------------------------

@pytest.mark.parametrize("program,status,rc", [
    ("def add(a, b):\n    return a + b\n\ndef check(f):\n    assert f(2, 3) == 5\n\ncheck(add)\n",
     "passed", 0),
    ("def add(a, b):\n    return a - b\n\nassert add(2, 3) == 5\n", "failed", 1),
    ("def add(a, b)\n    return a + b\n", "failed", 1),
    ("import sys\nsys.exit(3)\n", "failed", 3),
])
def test_pass_and_fail(sandbox, program, status, rc):
    ex = run(sandbox, program)
    assert (ex.status, ex.returncode) == (status, rc), ex
    if "add(a, b)\n" in program:
        assert "SyntaxError" in ex.output


def test_namespaces_are_used_where_the_platform_allows_them():
    """Where `unshare` works, the sandbox must not fall back, wherever the interpreter lives (a CI
    checkout's virtual environment in /tmp, a pyenv under /root): else every hostile test would
    only test the fallback."""
    probe = ["unshare", "--net", "--pid", "--fork", "--mount-proc", "true"]
    if not ROOT:
        probe[1:1] = ["--user", "--map-root-user"]
    try:
        allowed = subprocess.run(probe, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        allowed = False
    if not allowed:
        pytest.skip("this platform allows no namespaces")
    described = Sandbox(LIMITS).describe()
    assert described["mode"] == "namespaces", described["notes"]


def test_describe_is_json_and_reports_isolation(sandbox):
    d = json.loads(json.dumps(sandbox.describe()))
    assert d["limits"]["timeout_s"] == LIMITS.timeout_s
    if d["mode"] == "namespaces":
        for item in ("net", "pid", "mount", "read-only root"):
            assert item in d["isolation"]
    else:
        assert d["degraded"] and "network" in d["not_isolated"]
    if ROOT:
        assert "an unprivileged uid per concurrent run" in d["isolation"]


def test_describe_is_the_same_in_another_process(sandbox, request):
    """A resumed run (a new process) compares descriptions to reuse saved executions."""
    wanted = request.node.callspec.params["sandbox"]
    code = ("import json, sys\nfrom pixtral.eval.sandbox import Sandbox, SandboxLimits\n"
            f"limits = SandboxLimits(**{dataclasses.asdict(LIMITS)!r})\n"
            f"print(json.dumps(Sandbox(limits, namespaces={wanted!r}).describe()))\n")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(other.stdout) == json.loads(json.dumps(sandbox.describe()))


# -- time ----------------------------------------------------------------------

@pytest.mark.parametrize("program", ["while True:\n    pass\n", "import time\ntime.sleep(100)\n"])
def test_timeout(sandbox, program):
    ex = run(sandbox, program)
    assert ex.status == "timeout" and ex.returncode is None
    assert LIMITS.timeout_s <= ex.elapsed_s < LIMITS.timeout_s + MARGIN_S


# -- processes -----------------------------------------------------------------

def test_fork_bomb(sandbox):
    ex = run(sandbox, "import os\nwhile True:\n    os.fork()\n")
    assert ex.status in ("failed", "timeout")
    host_is_healthy()


def test_daemon_does_not_outlive_the_run(sandbox, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # only the sandbox may stop the write
    marker = shared / f"daemon-{uuid.uuid4().hex}"
    program = f"""
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(1.0)
        open({str(marker)!r}, "w").write("escaped")
        open("/tmp/{marker.name}", "w").write("escaped")
    os._exit(0)
print("parent done")
"""
    ex = run(sandbox, program)
    assert ex.status == "passed"
    time.sleep(2.0)
    assert not marker.exists()
    assert not Path(f"/tmp/{marker.name}").exists()
    host_is_healthy()


@pytest.mark.parametrize("program", [
    "import os\nos.kill(os.getppid(), 9)\n",
    "import os\nos.killpg(0, 9)\n",
    "import os\nos.kill(-1, 9)\n",
    "import os, signal\nos.killpg(os.getpgid(os.getppid()), signal.SIGKILL)\n",
    f"import os\nos.kill({os.getpid()}, 9)\n",
])
def test_cannot_kill_the_run(sandbox, program):
    if not ROOT and not is_isolated(sandbox):
        pytest.skip("non-root fallback: the program runs as our own user and may signal us")
    run(sandbox, program)
    # We are still here; the sandbox still works.
    assert run(sandbox, "print('alive')").status == "passed"
    host_is_healthy()


# -- memory and output ----------------------------------------------------------

@pytest.mark.parametrize("program", [
    "x = bytearray(1 << 40)\n",
    "x = []\nwhile True:\n    x.append(bytearray(1 << 20))\n",
])
def test_huge_allocations(sandbox, program):
    ex = run(sandbox, program)
    assert ex.status in ("failed", "timeout")
    assert "MemoryError" in ex.output or ex.status == "timeout" or ex.returncode < 0
    host_is_healthy()


def test_huge_stdout_is_bounded(sandbox):
    ex = run(sandbox, "while True:\n    print('x' * 1000)\n")
    assert ex.status in ("failed", "timeout")
    assert len(ex.output) <= 2000


# -- filesystem ----------------------------------------------------------------

def test_writes_outside_the_workdir(sandbox, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    name = f"sandbox-{uuid.uuid4().hex}"
    targets = {
        "world-writable dir": shared / name,
        "/tmp": Path("/tmp") / name,
        "/etc": Path("/etc") / name,
        "repository": REPO / name,
    }
    program = "".join(
        f"try:\n    open({str(p)!r}, 'w').write('x')\n    print('wrote', {str(p)!r})\n"
        f"except OSError as e:\n    print('blocked', e)\n"
        for p in targets.values())
    program += "open('inside.txt', 'w').write('fine')\nprint('inside ok')\n"
    try:
        ex = run(sandbox, program)
        assert ex.status == "passed" and "inside ok" in ex.output
        unprotected = set() if is_isolated(sandbox) else {"world-writable dir", "/tmp"}
        if not ROOT and not is_isolated(sandbox):
            unprotected |= {"repository"}
        for label, path in targets.items():
            if label not in unprotected:
                assert not path.exists(), f"sandbox wrote {label}: {path}"
    finally:
        for path in targets.values():
            path.unlink(missing_ok=True)


# -- network -------------------------------------------------------------------

def received_while(server: socket.socket, action) -> list[bytes]:
    """What clients send to a listening `server` while `action()` runs (and shortly after)."""
    server.listen(5)
    server.settimeout(0.2)
    got: list[bytes] = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            got.append(conn.recv(100))
            conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        action()
        time.sleep(0.3)
    finally:
        stop.set()
        thread.join(5)
        server.close()
    return got


def test_no_network(sandbox):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    port = server.getsockname()[1]
    got = received_while(server, lambda: run(sandbox, f"import socket\ns = socket.create_connection(('127.0.0.1', "
                                                      f"{port}), timeout=1)\ns.sendall(b'leak')\ns.close()\n"))
    if not is_isolated(sandbox):
        pytest.xfail("fallback mode does not isolate the network (documented)")
    assert got == []


def test_no_host_unix_sockets(sandbox):
    """A read-only mount does not stop connect(): host sockets live in /run, which the sandbox covers."""
    if not os.path.isdir("/run") or not os.access("/run", os.W_OK):
        pytest.skip("needs a writable /run to put a host socket in")
    path = f"/run/pixtral-sandbox-test-{os.getpid()}.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    os.chmod(path, 0o777)  # anyone may connect: only the sandbox can keep a program away
    try:
        got = received_while(server, lambda: run(sandbox, f"import socket\ns = socket.socket(socket.AF_UNIX)\n"
                                                          f"s.connect({path!r})\ns.sendall(b'leak')\ns.close()\n"))
    finally:
        os.unlink(path)
    if not is_isolated(sandbox):
        pytest.xfail("fallback mode does not hide host sockets (documented)")
    assert got == []


def test_environment_secrets_do_not_leak(sandbox, monkeypatch):
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    monkeypatch.setenv("PIXTRAL_TEST_SECRET", secret)
    child = subprocess.Popen(["sleep", "30"], env={"PIXTRAL_TEST_SECRET2": secret + "-child"})
    program = """
import os
for k, v in os.environ.items():
    print("env", k, v)
for pid in os.listdir("/proc"):
    try:
        data = open(f"/proc/{pid}/environ", "rb").read()
    except OSError:
        continue
    for item in data.split(b"\\0"):
        if b"SECRET" in item or b"s3cr3t" in item:
            print("proc", pid, item)
"""
    try:
        ex = run(sandbox, program)
    finally:
        child.kill()
        child.wait()
    assert ex.status == "passed", ex
    assert "PIXTRAL_TEST_SECRET" not in ex.output  # the program's own environment is scrubbed
    if not ROOT and not is_isolated(sandbox):
        pytest.xfail("fallback as non-root runs as the calling user, who may read its processes' environ "
                     "(documented)")
    assert secret not in ex.output


# -- concurrency ---------------------------------------------------------------

def test_concurrent_runs(sandbox):
    honest = "def f(x):\n    return x * 2\n\nassert f(21) == 42\nprint('ok')\n"
    programs = [
        honest,
        "import os\nwhile True:\n    os.fork()\n",
        honest,
        "x = []\nwhile True:\n    x.append(bytearray(1 << 20))\n",
        "while True:\n    pass\n",
        honest,
    ]
    t0 = time.monotonic()
    with ThreadPoolExecutor(len(programs)) as pool:
        results = list(pool.map(sandbox.run, programs))
    assert time.monotonic() - t0 < LIMITS.timeout_s + MARGIN_S + 2
    for program, ex in zip(programs, results):
        if program is honest:
            assert ex.status == "passed", ex
        else:
            assert ex.status != "passed"
    if ROOT:
        assert sandbox_pids() == []
    host_is_healthy()
