"""`pixtral eval` against our own engine (in-process) and our own server (real HTTP): same answers."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import httpx
import pytest
from language_data import write_math, write_mmlu

from pixtral.data.synth import SynthConfig, write_dataset


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    write_dataset(SynthConfig(out=out, n=120, seed=11), progress=False)
    return out


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pixtral.cli.main", "serve", "--model", str(tiny_checkpoint), "--port", str(port),
         "--served-model-name", "tiny"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"server did not start: {proc.stdout.read()}")
        time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(20)


def items(out):
    rows = [json.loads(line) for line in (out / "synth.items.jsonl").read_text().splitlines()]
    return {r["id"]: r for r in rows}


def test_in_process_and_server_give_the_same_answers(tmp_path, run_cli, synth_data, tiny_checkpoint, server):
    local, remote = tmp_path / "local", tmp_path / "remote"
    code, _, err = run_cli("synth", "--data", str(synth_data), "--model", str(tiny_checkpoint),
                           "--output-dir", str(local), "--no-progress", "--max-tokens", "8")
    assert code == 0, err
    code, _, err = run_cli("synth", "--data", str(synth_data), "--endpoint", f"{server}/v1", "--served-model", "tiny",
                           "--output-dir", str(remote), "--no-progress", "--max-tokens", "8")
    assert code == 0, err
    a, b = items(local), items(remote)
    assert a.keys() == b.keys() and len(a) >= 6
    assert all(r["status"] == "ok" for r in a.values()) and all(r["status"] == "ok" for r in b.values())
    assert {k: r["answer"] for k, r in a.items()} == {k: r["answer"] for k, r in b.items()}
    ma = json.loads((local / "synth.json").read_text())["metrics"]
    mb = json.loads((remote / "synth.json").read_text())["metrics"]
    assert ma == mb


def test_bad_local_model_is_a_clear_error(tmp_path, run_cli, synth_data):
    code, _, err = run_cli("synth", "--data", str(synth_data), "--model", str(tmp_path / "nope"),
                           "--output-dir", str(tmp_path / "out"), "--no-progress")
    assert code == 1
    assert "nope: no such checkpoint directory" in err and "Traceback" not in err


def test_language_tasks_in_process_and_server_agree(tmp_path, run_cli, tiny_checkpoint, server):
    """MMLU's first-token logprobs and MATH's seeded samples come back alike from the engine in-process
    and from our server: the letter logprobs through the OpenAI fields, the samples through `seed`."""
    data = {"mmlu": write_mmlu(tmp_path), "math": write_math(tmp_path)}
    extra = {"mmlu": (), "math": ("--samples", "2", "--max-tokens", "6")}
    for task in ("mmlu", "math"):
        local, remote = tmp_path / f"{task}-local", tmp_path / f"{task}-remote"
        code, _, err = run_cli(task, "--data", str(data[task]), "--model", str(tiny_checkpoint),
                               "--output-dir", str(local), "--no-progress", *extra[task])
        assert code == 0, err
        code, _, err = run_cli(task, "--data", str(data[task]), "--endpoint", f"{server}/v1", "--served-model", "tiny",
                               "--output-dir", str(remote), "--no-progress", *extra[task])
        assert code == 0, err
        a = {r["id"]: r for r in map(json.loads, (local / f"{task}.items.jsonl").read_text().splitlines())}
        b = {r["id"]: r for r in map(json.loads, (remote / f"{task}.items.jsonl").read_text().splitlines())}
        assert a.keys() == b.keys() and all(r["status"] == "ok" for r in [*a.values(), *b.values()])
        if task == "math":
            assert {k: r["answer"] for k, r in a.items()} == {k: r["answer"] for k, r in b.items()}
            assert any(len(set(r["answer"])) > 1 for r in a.values())  # the two samples differ somewhere
        else:
            for key in a:
                assert a[key]["answer"]["text"] == b[key]["answer"]["text"]
                top_a, top_b = a[key]["answer"]["top_logprobs"], b[key]["answer"]["top_logprobs"]
                assert len(top_a) == len(top_b) == 20
                assert [t for t, _ in top_a] == [t for t, _ in top_b]
                assert [lp for _, lp in top_a] == pytest.approx([lp for _, lp in top_b], abs=1e-4)


def test_multi_turn_and_code_tasks_on_our_engine(tmp_path, run_cli, tiny_checkpoint):
    """MT-Bench's second turn goes through our chat format after the model's own (possibly empty)
    answer, and HumanEval runs whatever the engine wrote: no item fails."""
    from language_data import write_humaneval, write_mt_bench

    for task, data in (("mt_bench", write_mt_bench(tmp_path)), ("humaneval", write_humaneval(tmp_path))):
        out = tmp_path / task
        code, _, err = run_cli(task, "--data", str(data), "--model", str(tiny_checkpoint), "--output-dir", str(out),
                               "--no-progress", "--max-tokens", "8", *(("--no-judge",) if task == "mt_bench" else ()))
        assert code == 0, err
        final = json.loads((out / f"{task}.json").read_text())
        assert final["counts"]["failed"] == 0 and final["counts"]["items"] == 3
        if task == "mt_bench":
            assert final["metrics"]["unjudged_turns"] == 6
        else:
            assert sum(final["metrics"]["executions"].values()) == 3
