"""Tensor parallelism in the engine: the driver (rank 0, the engine's own process) and its workers.

**Process layout.** The engine's process is the driver and rank 0: it runs the scheduler, the
KV-cache manager, the sampler and the output processor once, and its own share of the model.
Ranks 1..N-1 are worker processes, one per GPU (or N processes on the CPU, over gloo), each
holding its slices of the model (`pixtral.parallel.load_tp_model`) and a paged KV cache of its
own KV heads with the same number of blocks as the driver's (the driver takes the smallest that
any rank can hold, so one block table addresses every rank's cache). The driver starts them
itself (multiprocessing's spawn, daemonic) or, under `torchrun`, finds them already running
(every rank but 0 runs `tp_worker.run_torchrun_worker`).

**Step protocol.** Every forward call is a collective, so every rank must make the same calls
in the same order. The driver turns each step into plain data (`ModelRunner.prepare` ->
`StepInput`: flat token ids, chunk positions and block tables, image slots and the feature rows
that fill them, rows to sample), sends it to every worker over its control channel (a pipe, or
a TCP connection under torchrun; of each block table only the blocks added since the last step,
`BlockTableSender`) and then runs it itself (`ModelRunner.execute`); the workers run the same. Each rank answers "ok" or "failed" with its error. Sampling runs on the driver
only: the logits are gathered whole on every rank. A retried chunk (the engine's fault
isolation) is just another step.

**CUDA graphs.** Decode steps replay graphs on every rank (collectives captured inside): each
rank decides from the same step input whether to replay and at which padded shape, so the driver
checks at start-up that every rank's `ModelRunner.graph_plan` equals its own, and captures the
graphs with a "capture" command that every rank runs at once.

**Encoder cache.** Encoding images is collective too (the vision encoder is sharded, or each
rank encodes a share of the images and broadcasts them), so images to encode go to every rank
as an "encode" command with their keys (content hashes), and every worker keeps the features
under those keys: a mirror of the driver's `EncoderCache`. The driver's cache decides what is
kept; the keys it evicts travel with the next command and the workers drop them after running
it, so a step uses only features that every rank holds, and a worker holds no more than the
driver does.

**Failures.** A failure that every rank hits at the same point (an input the model cannot take)
leaves the ranks in step: the driver sends "resume" and the engine fails the request at fault,
as with one process. Anything else ends the engine: a rank that dies (the driver watches the
workers' process sentinels, or their liveness connections under torchrun, also between steps),
a rank that fails alone (a worker that is not told to resume within `RESUME_GRACE_S` leaves),
an error in a collective, or a step that does not finish within the group's timeout. The engine
is then marked dead (`TensorParallelError`; the server answers 503 and exits), the other
workers are killed and reaped, and no collective waits on a dead rank: gloo fails at once when
a peer's connection closes, and every collective has the group's timeout. Workers exit by
themselves when the driver goes away (their control channel closes, or their parent changes).

The messages, and the rule that decides whether the ranks are in step, are in `tp_protocol.py`;
the workers' loop is `tp_worker.py`.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import pickle
import secrets
import socket
import threading
import time
from collections.abc import Callable
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener, wait
from pathlib import Path
from typing import Any, TypeVar

import torch

from pixtral.engine.config import EngineConfig
from pixtral.engine.model_runner import ModelRunner
from pixtral.engine.tp_protocol import (BlockTableSender, Setup, exit_description, image_to_wire, receive, send,
                                        step_outcome)
from pixtral.errors import ConfigError, PixtralError

log = logging.getLogger("pixtral.engine")

T = TypeVar("T")


class TensorParallelError(PixtralError):
    """A tensor-parallel rank died, stopped answering or fell out of step: the engine cannot go on."""


# ---------------------------------------------------------------------- checks
def check_size(path: str | Path, size: int, device: torch.device) -> None:
    """Refuse a tensor-parallel size that cannot work here, before any process starts: the model's
    numbers (`pixtral.parallel.check_tensor_parallel`), and one GPU per rank on this machine (under
    torchrun: one per rank of this node)."""
    from pixtral.checkpoint.files import find_files, read_args
    from pixtral.parallel import check_tensor_parallel
    from pixtral.parallel.process_group import torchrun_env

    files = find_files(path)
    check_tensor_parallel(read_args(files), size, source=str(files.root))
    device = torch.device(device)
    if device.type == "cuda":
        env = torchrun_env()
        count = torch.cuda.device_count()
        if env is not None and env.world_size > 1:
            if env.local_world_size > count:
                raise ConfigError(f"torchrun starts {env.local_world_size} ranks on this node, but it has {count} GPUs")
            return
        first = device.index if device.index is not None else 0
        if first + size > count:
            raise ConfigError(f"tensor-parallel size {size} from cuda:{first} needs GPUs cuda:{first}..cuda:"
                              f"{first + size - 1} (one per rank), but this machine has {count}")


# ---------------------------------------------------------------------- the driver
class TensorParallelExecutor:
    """The driver's side: the workers, their channels, and one command at a time on every rank."""

    def __init__(self, size: int, device: torch.device, config: EngineConfig, timeout_s: float):
        self.size, self.device, self.config, self.timeout_s = size, device, config, timeout_s
        self.model = None  # rank 0's model, once loaded
        self.torchrun = False
        self.conns: dict[int, Connection] = {}  # rank -> control channel
        self.liveness: dict[int, Connection] = {}  # rank -> liveness connection (torchrun)
        self.procs: dict[int, mp.process.BaseProcess] = {}  # rank -> process (spawned workers)
        self.pids: dict[int, int] = {}
        self.failure: TensorParallelError | None = None
        self._callbacks: list[Callable[[TensorParallelError], None]] = []
        self._lock = threading.Lock()
        self._procs_lock = threading.Lock()
        self._reading = threading.Lock()  # held while the driver reads the workers' answers
        self._sending = threading.Lock()  # one message at a time on each channel (close() may race a step)
        self._closing = False
        self._closed = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._watcher: threading.Thread | None = None
        self._store = None

    # ------------------------------------------------------------------ start
    @classmethod
    def start(cls, path: str | Path, size: int, device: torch.device, dtype: torch.dtype | None,
              config: EngineConfig, timeout_s: float | None = None,
              quantization: str | None = None) -> "TensorParallelExecutor":
        """Start (or, under torchrun, join) the workers, set up the process group and load rank 0's model."""
        from pixtral.parallel import load_tp_model
        from pixtral.parallel.process_group import DEFAULT_TIMEOUT_S, torchrun_env

        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        env = torchrun_env()
        if env is not None and env.world_size > 1:
            if env.world_size != size:
                raise ConfigError(f"under torchrun with WORLD_SIZE={env.world_size}, the tensor-parallel size must be "
                                  f"{env.world_size}, got {size}")
            if env.rank != 0:
                raise ConfigError("under torchrun, only rank 0 runs the engine; the other ranks run "
                                  "pixtral.engine.tp_worker.run_torchrun_worker()")
            if device.type == "cuda":
                device = torch.device("cuda", env.local_rank)
        check_size(path, size, device)
        config = config.resolved(device)
        executor = cls(size, device, config, timeout_s or DEFAULT_TIMEOUT_S)
        try:
            if env is not None and env.world_size > 1:
                executor._attach(env)
            else:
                executor._spawn()
            executor._send_all(("setup", Setup(str(path), dtype, config, executor.timeout_s, quantization)))
            executor.model = load_tp_model(path, 0, size, device=device, dtype=dtype, quantization=quantization)
            return executor
        except BaseException:
            executor.close()
            raise

    def _spawn(self) -> None:
        from pixtral.engine.tp_worker import spawned_worker
        from pixtral.parallel.process_group import init_group, new_store

        if torch.distributed.is_initialized():
            raise ConfigError("this process is already in a torch.distributed process group (another tensor-parallel "
                              "engine that was not closed?); a tensor-parallel engine starts its own")
        ctx = mp.get_context("spawn")
        threads = torch.get_num_threads()
        if self.device.type == "cpu":  # the ranks share the machine's cores
            threads = max(1, threads // self.size)
            torch.set_num_threads(threads)
        self._store = new_store(self.size, timeout_s=self.timeout_s)
        for rank in range(1, self.size):
            device = torch.device("cuda", self.device.index + rank) if self.device.type == "cuda" else self.device
            parent, child = ctx.Pipe(duplex=True)
            proc = ctx.Process(target=spawned_worker, name=f"pixtral-tp-rank{rank}", daemon=True,
                               args=(rank, self.size, self._store.port, child, str(device), threads, os.getpid(),
                                     self.timeout_s))
            proc.start()
            child.close()
            self.conns[rank], self.procs[rank], self.pids[rank] = parent, proc, proc.pid
            log.info("tensor-parallel rank %d: worker process %d on %s", rank, proc.pid, device)
        self._start_watcher()
        self._expect("hello")  # each is about to join the group
        init_group(0, self.size, self.device, store=self._store, timeout_s=self.timeout_s)

    def _attach(self, env) -> None:
        """Under torchrun: join the group, then take the workers' control and liveness connections."""
        from pixtral.parallel.process_group import address_toward, broadcast_from_driver, init_group

        self.torchrun = True
        init_group(0, self.size, self.device, timeout_s=self.timeout_s)
        one_node = env.local_world_size == env.world_size
        host = "127.0.0.1" if one_node else address_toward(env.master_addr)
        authkey = secrets.token_bytes(32)
        listener = Listener(("127.0.0.1" if one_node else "0.0.0.0", 0), authkey=authkey)
        expired = threading.Event()

        def expire() -> None:  # accept() has no timeout of its own: wake it with a connection of ours
            expired.set()
            try:
                socket.create_connection(("127.0.0.1" if one_node else host, listener.address[1]), 5).close()
            except OSError:
                pass

        timer = threading.Timer(self.timeout_s, expire)
        timer.daemon = True
        try:
            broadcast_from_driver((host, listener.address[1], authkey))
            timer.start()
            while len(self.conns) + len(self.liveness) < 2 * (self.size - 1):
                try:
                    conn = listener.accept()
                    kind, rank, pid, role = receive(conn)
                except (OSError, EOFError, AuthenticationError, ValueError, pickle.UnpicklingError):
                    if expired.is_set():
                        raise TensorParallelError(f"the torchrun workers did not all connect within "
                                                  f"{self.timeout_s:g} s ({len(self.conns)} of {self.size - 1})") from None
                    continue  # not one of ours
                (self.conns if role == "control" else self.liveness)[rank] = conn
                self.pids[rank] = pid
        finally:
            timer.cancel()
            listener.close()
        for rank in sorted(self.conns):
            log.info("tensor-parallel rank %d: torchrun worker process %d", rank, self.pids[rank])
        self._start_watcher()

    # ------------------------------------------------------------------ engine start-up
    def wait_loaded(self) -> None:
        self._expect("loaded")

    def agree_num_blocks(self, own: int) -> int:
        """The smallest number of KV blocks any rank can hold; every rank's cache gets that many."""
        blocks = min([own] + [m[1] for m in self._expect("blocks").values()])
        self._send_all(("cache", blocks))
        return blocks

    def wait_ready(self, graph_plan: tuple | None) -> None:
        """Every rank built its runner, with the driver's decode-graph plan (`ModelRunner.graph_plan`)."""
        for rank, (_, plan) in sorted(self._expect("ready").items()):
            if plan != graph_plan:
                raise self._fail(TensorParallelError(
                    f"tensor-parallel rank {rank} would run decode steps differently from rank 0 (its CUDA-graph "
                    f"plan {plan}, rank 0's {graph_plan}: batch buckets, block-table widths, Triton kernel, "
                    "gather limit); the ranks' GPUs or software differ"))
        log.info("tensor parallelism: %d ranks ready", self.size)

    def make_runner(self, model, cache, config: EngineConfig, max_model_len: int) -> "TensorParallelRunner":
        return TensorParallelRunner(model, cache, config, max_model_len, self)

    # ------------------------------------------------------------------ commands
    def run(self, command: tuple, local: Callable[[], T]) -> T:
        """Send `command` to every worker, run `local` (the same on rank 0), and check that every
        rank did the same: all succeeded, or all failed alike (then the local error is raised and
        the workers resume). Anything else raises TensorParallelError and ends the engine."""
        self._raise_if_failed()
        self._send_all(command)
        error = None
        try:
            result = local()
        except Exception as exc:  # noqa: BLE001 - compared with the workers' results below
            error = exc
        except BaseException as exc:  # interrupted in the middle of a collective: out of step for good
            self._fail(TensorParallelError(f"interrupted during a tensor-parallel step ({type(exc).__name__})"))
            raise
        try:
            statuses = self._expect(("ok", "failed"))
        except TensorParallelError:
            raise
        except BaseException as exc:  # the answers are left unread: out of step for good
            self._fail(TensorParallelError(f"interrupted while waiting for the tensor-parallel workers "
                                           f"({type(exc).__name__})"))
            raise
        problem = step_outcome(error, statuses)
        if problem is not None:
            raise self._fail(TensorParallelError(problem)) from error
        if error is not None:
            self._send_all(("resume",))
            raise error
        return result

    def _send_all(self, message: Any) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        with self._sending:
            for rank, conn in self.conns.items():
                try:
                    conn.send_bytes(data)
                except (OSError, ValueError):
                    broken = rank
                    break
            else:
                return
        raise self._fail(self._death(broken)) from None

    def _expect(self, kinds: str | tuple[str, ...]) -> dict[int, tuple]:
        """One message from each worker, of one of `kinds`; fails the engine on a death, an error or a timeout."""
        with self._reading:  # the watcher waits: a worker's last words are read here, not lost
            return self._read_all((kinds,) if isinstance(kinds, str) else kinds)

    def _read_all(self, kinds: tuple[str, ...]) -> dict[int, tuple]:
        pending = dict(self.conns)
        by_object: dict[Any, int] = {conn: rank for rank, conn in pending.items()}
        with self._procs_lock:
            sentinels = {p.sentinel: r for r, p in self.procs.items()}
        got: dict[int, tuple] = {}
        deadline = time.monotonic() + self.timeout_s
        while pending:
            self._raise_if_failed()
            left = deadline - time.monotonic()
            if left <= 0:
                names = ", ".join(str(r) for r in sorted(pending))
                raise self._fail(TensorParallelError(
                    f"tensor-parallel rank(s) {names} did not answer within {self.timeout_s:g} s"))
            ready = wait(list(pending.values()) + list(sentinels), timeout=min(left, 1.0))
            for obj in ready:
                if obj in sentinels:
                    if sentinels[obj] in pending:  # its last message may still be unread: read it first
                        continue
                    raise self._fail(self._death(sentinels[obj]))
                rank = by_object[obj]
                try:
                    message = receive(obj)
                except (EOFError, OSError):
                    raise self._fail(self._death(rank)) from None
                if message[0] == "error":
                    raise self._fail(TensorParallelError(f"tensor-parallel rank {rank}: {message[1]}"))
                if message[0] not in kinds:
                    raise self._fail(TensorParallelError(
                        f"tensor-parallel rank {rank} answered {message[0]!r}, expected {' or '.join(kinds)}"))
                got[rank] = message
                del pending[rank]
            dead = [sentinels[s] for s in ready if s in sentinels and sentinels[s] in pending]
            for rank in dead:  # dead with nothing left to read
                if not pending[rank].poll(0):
                    raise self._fail(self._death(rank))
        return got

    # ------------------------------------------------------------------ failures
    def add_failure_callback(self, callback: Callable[[TensorParallelError], None]) -> None:
        """Call `callback(error)` once if the engine fails (from the thread that finds it; at once if it has)."""
        with self._lock:
            failure = self.failure
            if failure is None:
                self._callbacks.append(callback)
                return
        callback(failure)

    def _raise_if_failed(self) -> None:
        if self.failure is not None:
            raise self.failure
        if self._closed:
            raise TensorParallelError("the tensor-parallel workers are shut down")

    def _death(self, rank: int, last_words: bool = False) -> TensorParallelError:
        """Why rank `rank` is gone: its exit code, and (`last_words`) the error it sent before leaving."""
        proc = self.procs.get(rank)
        code = None
        if proc is not None:
            with self._procs_lock:
                proc.join(2)
                code = proc.exitcode
        said = ""
        conn = self.conns.get(rank)
        if last_words and conn is not None:
            try:
                while conn.poll(0):
                    message = receive(conn)
                    if message[0] in ("error", "failed"):
                        said = f" after: {message[-1] if message[0] == 'error' else ': '.join(message[1:3])}"
            except (EOFError, OSError, pickle.UnpicklingError):
                pass
        pid = self.pids.get(rank)
        return TensorParallelError(
            f"tensor-parallel worker rank {rank} (pid {pid}) died: {exit_description(code)}{said}")

    def _fail(self, error: TensorParallelError) -> TensorParallelError:
        """Record the engine's end (the first reason wins), stop every worker, tell the callbacks."""
        with self._lock:
            if self.failure is not None or self._closing:
                return self.failure or error
            self.failure = error
            callbacks, self._callbacks = self._callbacks, []
        log.error("%s; stopping the other workers", error)
        self._stop_workers(graceful=False)
        for callback in callbacks:
            try:
                callback(error)
            except Exception:  # noqa: BLE001
                log.exception("a tensor-parallel failure callback failed")
        return error

    def _start_watcher(self) -> None:
        self._watcher = threading.Thread(target=self._watch, name="pixtral-tp-watcher", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        """Between steps too: a worker that dies ends the engine at once (the server answers 503)."""
        with self._procs_lock:
            watched = {p.sentinel: r for r, p in self.procs.items()}
        watched.update({conn: r for r, conn in self.liveness.items()})
        while watched:
            ready = wait(list(watched) + [self._wake_r])
            if self._closing or self.failure is not None:
                return
            gone = [watched[obj] for obj in ready if obj is not self._wake_r]
            if not gone:
                continue
            with self._reading:  # a step in progress finds the death itself; else we read its last words
                if self._closing or self.failure is not None:
                    return
                error = self._death(gone[0], last_words=True)
            self._fail(error)
            return

    # ------------------------------------------------------------------ shutdown
    def _stop_workers(self, graceful: bool, timeout: float = 10.0) -> None:
        if graceful and self.failure is None:
            with self._sending:
                for conn in self.conns.values():
                    try:
                        send(conn, ("stop",))
                    except (OSError, ValueError):
                        pass
        if not graceful and self.torchrun:  # torchrun's workers: closing their channels makes them leave
            for conn in list(self.conns.values()) + list(self.liveness.values()):
                try:
                    conn.close()
                except OSError:
                    pass
        with self._procs_lock:
            deadline = time.monotonic() + (timeout if graceful else 0)
            for proc in self.procs.values():
                proc.join(max(0.0, deadline - time.monotonic()))
            for proc in self.procs.values():
                if proc.is_alive():
                    proc.terminate()
            for proc in self.procs.values():
                proc.join(2)
                if proc.is_alive():
                    proc.kill()
                    proc.join(5)

    def close(self) -> None:
        """Stop every worker (asked to, then terminated or killed), reap them, leave the process group."""
        with self._lock:
            if self._closed:
                return
            self._closing = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        self._stop_workers(graceful=True)
        for conn in list(self.conns.values()) + list(self.liveness.values()):
            try:
                conn.close()
            except OSError:
                pass
        if self._watcher is not None:
            self._watcher.join(5)
        self._wake_r.close()
        self._wake_w.close()
        # A failed group is left alone on the GPU (NCCL may wait on the dead rank); gloo leaves at once.
        if self.failure is None or self.device.type == "cpu":
            from pixtral.parallel.process_group import destroy_group

            try:
                if not destroy_group():
                    log.warning("leaving the tensor-parallel process group did not finish within 10 s; left as it is")
            except Exception:  # noqa: BLE001
                log.warning("leaving the tensor-parallel process group failed", exc_info=True)
        self._closed = True
        log.info("tensor parallelism: workers stopped")


class TensorParallelRunner(ModelRunner):
    """The driver's model runner: each image encoding and each forward pass is a command that every
    rank runs (see the module's docstring). The engine sets `encoder_cache`: its evictions go to the
    workers with each command."""

    def __init__(self, model, cache, config: EngineConfig, max_model_len: int, executor: TensorParallelExecutor):
        super().__init__(model, cache, config, max_model_len)
        self.executor = executor
        self.encoder_cache = None
        self.tables = BlockTableSender()

    def _drops(self, keep: list[bytes] = ()) -> list[bytes]:
        return self.encoder_cache.take_evicted(keep) if self.encoder_cache is not None else []

    def encode_images(self, images: list[torch.Tensor], keys: list[bytes] | None = None) -> list[torch.Tensor]:
        if keys is None:  # not for the cache: the workers forget them after this command
            keys = [b"uncached:" + secrets.token_bytes(8) for _ in images]
            drops = list(keys) + self._drops()
        else:
            keys = list(keys)
            drops = self._drops(keep=keys)
        command = ("encode", keys, [image_to_wire(img) for img in images], drops)
        return self.executor.run(command, lambda: ModelRunner.encode_images(self, images))

    def capture_graphs(self) -> None:
        """Every rank captures the same decode graphs at once (a graph's collectives are captured
        together with the other ranks', and replayed together: every rank runs each step)."""
        if self.graphs is not None:
            self.executor.run(("capture", self._drops()), lambda: ModelRunner.capture_graphs(self))

    def forward(self, chunks, features):
        step = self.prepare(chunks)
        command = ("forward", dataclasses.replace(step, chunks=[]), self.tables.encode(step.chunks), self._drops())
        return self.executor.run(command, lambda: self.execute(step, features))


# ---------------------------------------------------------------------- torchrun workers' connections
def connect_to_driver(rank: int) -> Connection:
    """Under torchrun (group already joined): learn the driver's address, open the control and
    liveness connections; returns the control one (the liveness one stays open with the process)."""
    from pixtral.parallel.process_group import broadcast_from_driver

    host, port, authkey = broadcast_from_driver()
    control = Client((host, port), authkey=authkey)
    send(control, ("hello", rank, os.getpid(), "control"))
    liveness = Client((host, port), authkey=authkey)
    send(liveness, ("hello", rank, os.getpid(), "liveness"))
    _KEEP.append(liveness)
    return control


_KEEP: list[Connection] = []
