"""A tensor-parallel worker: ranks 1..N-1 of an engine, running the driver's commands (see `executor.py`).

Started by the driver (`spawned_worker`, through multiprocessing's spawn) or by torchrun
(`run_torchrun_worker`, from the CLI on every rank but 0). Either way the worker

1. joins the process group, and tells the driver it is there;
2. takes its setup from the driver (checkpoint, dtype, engine config), loads its slices of the
   model, sizes its KV cache like the driver does (on a GPU by profiling the largest step, a
   collective the driver runs at the same time), and builds the cache with the number of blocks
   the driver chose for every rank;
3. runs commands until told to stop: "encode" (images, kept under their keys: its mirror of the
   driver's encoder cache), "forward" (a `StepInput`), "capture" (the decode CUDA graphs, on
   every rank at once: their collectives are captured together), each followed by dropping the keys the
   driver's cache evicted; it answers "ok" or "failed" with its error.

A worker that failed a command waits for "resume" (every rank failed alike, so all are still in
step); if it does not come within `RESUME_GRACE_S`, it failed alone and leaves. It also leaves when
its control channel closes or its parent changes (the driver is gone): never an orphan.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection

import torch

from pixtral.engine.tp_protocol import (OK, RESUME_GRACE_S, BlockTableReceiver, Setup, image_from_wire,
                                        is_communication_error, receive, send)

log = logging.getLogger("pixtral.engine")


class Stop(Exception):
    """The driver told us to stop (`orderly`), or is gone."""

    def __init__(self, why: str, orderly: bool = False):
        super().__init__(why)
        self.orderly = orderly


class Worker:
    def __init__(self, rank: int, size: int, device: torch.device, conn: Connection):
        self.rank, self.size, self.device, self.conn = rank, size, torch.device(device), conn
        self.runner = None
        self.features: dict[bytes, torch.Tensor] = {}  # mirror of the driver's encoder cache
        self.tables = BlockTableReceiver()  # the block tables of the requests in the last step

    def expect(self, kind: str) -> tuple:
        try:
            message = receive(self.conn)
        except (EOFError, OSError):
            raise Stop("the driver closed the connection") from None
        if message[0] == "stop":
            raise Stop("asked to stop", orderly=True)
        if message[0] != kind:
            raise RuntimeError(f"expected {kind!r} from the driver, got {message[0]!r}")
        return message

    def build(self) -> None:
        from pixtral.engine.fusion import fuse
        from pixtral.engine.kv_cache import PagedKVCache, engine_num_blocks
        from pixtral.engine.model_runner import ModelRunner
        from pixtral.parallel import load_tp_model

        setup: Setup = self.expect("setup")[1]
        cfg = setup.config
        model = load_tp_model(setup.path, self.rank, self.size, device=self.device, dtype=setup.dtype,
                              quantization=setup.quantization)
        if self.device.type == "cuda":
            fuse(model, projections=cfg.fuse_projections, kernels=cfg.triton_kernels)
        send(self.conn, ("loaded",))
        send(self.conn, ("blocks", engine_num_blocks(model, cfg)))  # on a GPU: a collective with every rank
        num_blocks = self.expect("cache")[1]
        cache = PagedKVCache(model.args, num_blocks, cfg.block_size, self.device, model.dtype)
        max_model_len = min(model.args.max_seq_len, cfg.max_model_len or model.args.max_seq_len)
        kv_capacity = (num_blocks - 1) * cfg.block_size  # as the driver's engine counts it (one block is reserved)
        self.runner = ModelRunner(model, cache, cfg, min(max_model_len, kv_capacity))
        send(self.conn, ("ready", self.runner.graph_plan()))

    @torch.inference_mode()
    def serve(self) -> None:
        while True:
            try:
                message = receive(self.conn)
            except (EOFError, OSError):
                raise Stop("the driver closed the connection") from None
            kind, drops = message[0], message[-1]
            if kind == "stop":
                raise Stop("asked to stop", orderly=True)
            status, fatal = OK, False
            try:
                if kind == "encode":
                    _, keys, images, _ = message
                    feats = self.runner.encode_images([image_from_wire(img) for img in images])
                    self.features.update(zip(keys, feats))
                elif kind == "forward":
                    _, step, tables, _ = message
                    step.chunks = self.tables.decode(tables)
                    self.runner.execute(step, self.features)
                elif kind == "capture":
                    self.runner.capture_graphs()
                else:
                    raise RuntimeError(f"unknown command {kind!r} from the driver")
            except Exception as exc:  # noqa: BLE001 - reported; the driver decides whether the ranks are in step
                log.warning("tensor-parallel rank %d: %s failed: %s: %s", self.rank, kind, type(exc).__name__, exc)
                status = pickle.dumps(("failed", type(exc).__name__, str(exc)))
                fatal = is_communication_error(exc)
            finally:
                for key in drops:
                    self.features.pop(key, None)
            self.conn.send_bytes(status)
            if fatal:
                raise RuntimeError("the process group failed (see above)")
            if status is not OK:
                self.resume()

    def resume(self) -> None:
        """After a failed command: go on only if the driver says every rank failed alike."""
        if not self.conn.poll(RESUME_GRACE_S):
            raise RuntimeError(f"rank {self.rank} failed a step alone (no word from the driver within "
                               f"{RESUME_GRACE_S:g} s): it is out of step with the other ranks")
        self.expect("resume")


def _run(worker: Worker) -> int:
    """Build and serve -> 0 when stopped in order (the process group may be left), 2 when the driver
    went away (it may not: a collective could wait on it), 1 on an error (told to the driver)."""
    try:
        worker.build()
        worker.serve()
    except Stop as stop:
        log.info("tensor-parallel rank %d: %s", worker.rank, stop)
        if stop.orderly and worker.runner is not None:
            worker.runner.release_graphs()  # before the group is left (see ModelRunner.release_graphs)
        return 0 if stop.orderly else 2
    except BaseException as exc:  # noqa: BLE001 - told to the driver, which ends the engine
        log.error("tensor-parallel rank %d failed:\n%s", worker.rank, traceback.format_exc())
        try:
            send(worker.conn, ("error", f"{type(exc).__name__}: {exc}"))
        except (OSError, ValueError):
            pass
        return 1
    return 0


def _configure_logging(rank: int) -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s tp-rank{rank}: %(message)s")


def _exit_with_parent(parent_pid: int) -> None:
    """Leave as soon as the driver's process is gone, whatever this process is doing (a collective
    on a dead peer included)."""

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(0.5)

    threading.Thread(target=watch, name="pixtral-tp-parent", daemon=True).start()


def spawned_worker(rank: int, size: int, store_port: int, conn: Connection, device: str, threads: int,
                   parent_pid: int, timeout_s: float) -> None:
    """The target of a worker the driver spawns (daemonic: multiprocessing ends it with the driver)."""
    from pixtral.parallel.process_group import destroy_group, init_group, join_store

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the driver, which stops us in order
    _exit_with_parent(parent_pid)
    _configure_logging(rank)
    torch.set_num_threads(threads)
    code = 1
    try:
        send(conn, ("hello", rank, os.getpid()))
        init_group(rank, size, torch.device(device), store=join_store(store_port, size, timeout_s=timeout_s),
                   timeout_s=timeout_s)
        code = _run(Worker(rank, size, torch.device(device), conn))
        if code == 0:
            destroy_group()
        code = min(code, 1)
    except BaseException as exc:  # noqa: BLE001
        log.error("tensor-parallel rank %d could not start: %s: %s", rank, type(exc).__name__, exc)
        try:
            send(conn, ("error", f"could not start: {type(exc).__name__}: {exc}"))
        except (OSError, ValueError):
            pass
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # no teardown that could wait on a dead peer


def run_torchrun_worker(device_type: str = "cuda") -> int:
    """A rank other than 0 under torchrun: join the group, connect to the driver, serve; -> exit code.

    `device_type` must be the driver's ("cuda": this rank uses cuda:LOCAL_RANK; "cpu": gloo).
    """
    from pixtral.engine.executor import connect_to_driver
    from pixtral.parallel.process_group import destroy_group, init_group, torchrun_env

    env = torchrun_env()
    if env is None or env.rank == 0:
        raise RuntimeError("run_torchrun_worker is for the ranks other than 0 of a torchrun launch")
    # torchrun passes SIGTERM (and Ctrl-C, SIGINT) to every rank at once: rank 0 gets it too and stops us
    # in order; if rank 0 is gone, our control connection closes and we leave (torchrun kills us in the end).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _configure_logging(env.rank)
    device = torch.device("cuda", env.local_rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda" and env.local_rank >= torch.cuda.device_count():
        log.error("rank %d: LOCAL_RANK %d but this node has %d GPUs", env.rank, env.local_rank,
                  torch.cuda.device_count())
        return 1
    init_group(env.rank, env.world_size, device)
    code = _run(Worker(env.rank, env.world_size, device, connect_to_driver(env.rank)))
    if code == 0:
        destroy_group()
    return min(code, 1)
