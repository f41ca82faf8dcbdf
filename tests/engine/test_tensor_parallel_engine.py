"""`LLM(path, tensor_parallel_size=2)`: this process is rank 0 and drives one worker process over gloo.

Greedy answers equal the one-process engine's for text and image chats run together (chunked
prefill, prefix-cache and encoder-cache hits, encoder-cache evictions that the worker must
mirror), for both checkpoint layouts and both ways of splitting KV heads and the vision encoder;
a request that fails on every rank fails alone and the ranks stay in step; the worker is gone
after `close()`, and a size the model cannot take is refused before any process starts.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import time
import types

import pytest
import torch
from tiny_model import image_uri, tiny_args, user

from pixtral.checkpoint import load_model, save_model
from pixtral.engine import LLM
from pixtral.engine import EngineConfig
from pixtral.engine.chunk import Chunk
from pixtral.engine.executor import TensorParallelError, TensorParallelExecutor
from pixtral.engine.tp_protocol import BlockTableReceiver, BlockTableSender, step_outcome
from pixtral.errors import ConfigError
from pixtral.generation import SamplingParams
from pixtral.model import Pixtral
from pixtral.processing import load_processor
from pixtral.processing.loading import write_tokenizer_for

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
# Small steps (chunked prompts beside decodes) and a small encoder cache (images evicted and
# encoded again), so that the worker follows every kind of step and every eviction.
# Few KV blocks, so that a request is preempted (its table freed, then a new one).
OPTIONS = dict(num_blocks=24, max_num_batched_tokens=48, max_num_seqs=8, encoder_cache_tokens=80)


def conversations() -> list[list[dict]]:
    return [[user(f"Question {i}?" + " more" * (i * 5), *([image_uri(i)] if i % 2 else []))] for i in range(6)] + [
        [user("Two pictures, please.", image_uri(20, (64, 64)), image_uri(21, (120, 90)))],
    ]


def hf_replicated_checkpoint(path):
    """HF layout; one KV head (replicated on both ranks); a vision FFN width of 63, so the encoder is
    replicated and each rank encodes a share of the images."""
    args = tiny_args()
    args = dataclasses.replace(args, n_kv_heads=1, vision=dataclasses.replace(args.vision, intermediate_size=63))
    torch.manual_seed(1)
    model = Pixtral(args)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            torch.nn.init.ones_(p)
        else:
            torch.nn.init.normal_(p, std=0.1)
    tok = write_tokenizer_for(args, path.parent / f"{path.name}-tekken.json")
    return save_model(model, path, layout="hf", tokenizer_file=tok)


@pytest.fixture(scope="module")
def checkpoints(tiny_dir, tmp_path_factory):
    # tiny_dir: Mistral layout, two KV heads (one per rank), vision encoder sharded
    return {"mistral": tiny_dir, "hf_replicated": hf_replicated_checkpoint(tmp_path_factory.mktemp("tp") / "hf")}


IMAGES = [i for i in range(6) if i % 2] + [20, 21]


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie is not alive, but must not stay either
    except FileNotFoundError:
        return False


def gone(pid: int) -> bool:
    return not os.path.exists(f"/proc/{pid}")


@pytest.mark.parametrize("name", ["mistral", "hf_replicated"])
def test_two_ranks_answer_as_one_process(checkpoints, name):
    path = checkpoints[name]
    convs = conversations()
    one = LLM.from_model(load_model(path), load_processor(path), **OPTIONS)
    expected = token_ids(one.chat(convs, GREEDY))
    with LLM(path, tensor_parallel_size=2, **OPTIONS) as llm:
        executor = llm.engine.executor
        pids = list(executor.pids.values())
        assert len(pids) == 1 and all(alive(p) for p in pids)
        assert llm.engine.cache.n_kv_heads == 1  # the rank's KV heads only
        assert llm.model.tensor_parallel.spread_images == (name == "hf_replicated")
        assert token_ids(llm.chat(convs, GREEDY)) == expected
        assert llm.engine.stats().preemptions_total > 0
        assert llm.engine.encoder_cache.size <= OPTIONS["encoder_cache_tokens"]  # some were evicted
        assert token_ids(llm.chat(convs, GREEDY)) == expected  # prefix-cache hits
        assert llm.engine.stats().prefix_cache_hit_tokens_total > 0
        llm.engine.reset_prefix_cache()  # every cached image dropped, on the worker too
        assert token_ids(llm.chat(convs, GREEDY)) == expected
        assert llm.engine.stats().images_encoded_total == 2 * len(IMAGES)
        assert token_ids(llm.generate([c[0]["content"] for c in convs[:4:2]], GREEDY)) == token_ids(
            one.generate([c[0]["content"] for c in convs[:4:2]], GREEDY))
        # n choices fork off the prompt (its last block copied on every rank), with prompt logprobs
        forked = SamplingParams(temperature=1.0, seed=3, max_tokens=6, n=3, prompt_logprobs=1, presence_penalty=0.5)
        mine, theirs = (x.generate("Forked choices, on two ranks: a prompt never sent before", forked)[0]
                        for x in (llm, one))
        assert [o.token_ids for o in mine.outputs] == [o.token_ids for o in theirs.outputs]
        assert [lp.logprob for lp in mine.prompt_logprobs[1:]] == pytest.approx(
            [lp.logprob for lp in theirs.prompt_logprobs[1:]], abs=1e-4)
    # close(): asked to stop, the worker left the group and exited; nothing is left
    assert all(p.exitcode == 0 for p in executor.procs.values())
    assert all(gone(p) for p in pids)
    assert not multiprocessing.active_children() or all(not c.name.startswith("pixtral-tp") for c in
                                                         multiprocessing.active_children())


class StubRunner:
    """A worker's runner whose forward passes fail on request: the step protocol without a model."""

    def execute(self, step, features):
        if step.name in ("bad input", "worker only"):
            raise RuntimeError(step.name)

    def capture_graphs(self):
        raise RuntimeError("captured")  # seen by the driver as this rank's answer


def stub_worker(conn) -> None:  # a spawned process: rank 1 serving commands with `StubRunner`
    from pixtral.engine.tp_worker import Stop, Worker

    worker = Worker(1, 2, "cpu", conn)
    worker.runner = StubRunner()
    try:
        worker.serve()
    except Stop:
        os._exit(0)
    os._exit(3)


def test_a_step_every_rank_fails_alike_fails_alone_and_anything_else_ends_the_engine():
    """Every rank failing the same step with the same error (an input the model cannot take) keeps
    them in step: the driver raises its error (the engine fails that request) and the worker resumes.
    A step that fails on one rank only ends the engine: TensorParallelError, the worker killed."""
    ctx = multiprocessing.get_context("spawn")
    executor = TensorParallelExecutor(2, torch.device("cpu"), EngineConfig().resolved(torch.device("cpu")), 30.0)
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=stub_worker, args=(child,), daemon=True)
    proc.start()
    child.close()
    executor.conns[1], executor.procs[1], executor.pids[1] = parent, proc, proc.pid
    executor._start_watcher()

    def fails(message):
        raise RuntimeError(message)

    def forward(name):  # a command as the driver's runner sends it: step, new blocks, keys to drop
        return ("forward", types.SimpleNamespace(name=name), [], [])

    try:
        assert executor.run(forward("fine"), lambda: 1) == 1
        with pytest.raises(RuntimeError, match="bad input"):
            executor.run(forward("bad input"), lambda: fails("bad input"))
        assert executor.run(forward("fine"), lambda: 2) == 2  # the worker resumed
        with pytest.raises(RuntimeError, match="captured"):  # "capture" reaches the worker's runner
            executor.run(("capture", []), lambda: fails("captured"))
        assert executor.run(forward("fine"), lambda: 5) == 5
        with pytest.raises(TensorParallelError, match=r"out of step: rank 0 ok; rank 1 failed \(RuntimeError: "
                                                       r"worker only\)"):
            executor.run(forward("worker only"), lambda: 3)
        assert proc.exitcode is not None  # killed and reaped
        with pytest.raises(TensorParallelError):
            executor.run(forward("fine"), lambda: 4)
    finally:
        executor.close()
    assert gone(proc.pid)


def test_a_worker_that_dies_ends_the_engine_with_its_rank_and_exit_code(tiny_dir):
    llm = LLM(tiny_dir, tensor_parallel_size=2, **OPTIONS)
    try:
        (rank, proc), = llm.engine.executor.procs.items()
        proc.kill()
        deadline = time.monotonic() + 10
        while llm.engine.executor.failure is None:  # the watcher sees it between steps
            assert time.monotonic() < deadline, "the death went unnoticed"
            time.sleep(0.05)
        message = str(llm.engine.executor.failure)
        assert f"rank {rank} (pid {proc.pid}) died: killed by signal SIGKILL" in message
        with pytest.raises(Exception, match="died"):
            llm.chat([[user("Anyone there?")]], GREEDY)
    finally:
        llm.close()
    assert gone(proc.pid)


def test_ranks_that_would_run_decode_steps_differently_are_refused(tiny_dir, monkeypatch):
    """A rank whose CUDA-graph plan differs from the driver's would replay a padded batch while
    another runs the real one, and their collectives would not match: refused at start, naming it."""
    from pixtral.engine.model_runner import ModelRunner

    plan = ((1, 2, 4), 8, True, 4096)
    monkeypatch.setattr(ModelRunner, "graph_plan", lambda self: plan)  # the driver only: the worker has none
    with pytest.raises(TensorParallelError, match=r"rank 1 would run decode steps differently from rank 0 "
                                                  r"\(its CUDA-graph plan None, rank 0's \(\(1, 2, 4\), 8, True, 4096\)"):
        LLM(tiny_dir, tensor_parallel_size=2, **OPTIONS)
    assert not [c for c in multiprocessing.active_children() if c.name.startswith("pixtral-tp")]


def test_a_size_the_model_cannot_take_is_refused_before_any_process_starts(tiny_dir):
    with pytest.raises(ConfigError, match=r"n_heads \(4\) is not divisible by the tensor-parallel size 3"):
        LLM(tiny_dir, tensor_parallel_size=3)
    with pytest.raises(ConfigError, match="checkpoint path"):
        LLM.from_model(None, None, tensor_parallel_size=2)
    assert not [c for c in multiprocessing.active_children() if c.name.startswith("pixtral-tp")]


def test_workers_get_only_the_blocks_each_table_gained():
    sender, receiver = BlockTableSender(), BlockTableReceiver()
    a, b = types.SimpleNamespace(request_id="a"), types.SimpleNamespace(request_id="b")
    table_a, table_b = [5, 6], [7]

    def step(*chunks):
        wire = sender.encode(chunks)
        got = receiver.decode(wire)
        assert [(c.start, c.length, c.block_ids) for c in got] == [(c.start, c.length, c.block_ids) for c in chunks]
        return [(w[0], w[3], w[4]) for w in wire]

    assert step(Chunk(0, 20, table_a, a), Chunk(0, 9, table_b, b)) == [("a", True, [5, 6]), ("b", True, [7])]
    table_a.append(9)  # grows in place: only the new block goes
    assert step(Chunk(20, 1, table_a, a), Chunk(9, 1, table_b, b)) == [("a", False, [9]), ("b", False, [])]
    assert step(Chunk(21, 1, table_a, a)) == [("a", False, [])]  # b sits this step out: forgotten
    table_b.append(3)
    assert step(Chunk(21, 1, table_a, a), Chunk(10, 1, table_b, b)) == [("a", False, []), ("b", True, [7, 3])]
    table_a = [11]  # preempted, then a new table
    assert step(Chunk(0, 16, table_a, a)) == [("a", True, [11])]


def test_the_driver_tells_in_step_from_out_of_step():
    ok, failed = ("ok",), ("failed", "RuntimeError", "bad image")
    assert step_outcome(None, {1: ok, 2: ok}) is None
    assert step_outcome(RuntimeError("bad image"), {1: failed, 2: failed}) is None  # every rank, alike
    for local, statuses in [(None, {1: failed}), (RuntimeError("bad image"), {1: ok}),
                            (RuntimeError("bad image"), {1: failed, 2: ok}),
                            (RuntimeError("other"), {1: failed}),
                            (RuntimeError("[gloo/pair.cc] Connection reset"), {1: ("failed", "RuntimeError",
                                                                                 "[gloo/pair.cc] Connection reset")})]:
        problem = step_outcome(local, statuses)
        assert problem is not None and "out of step" in problem and "rank 1" in problem
