"""The in-process backend, against a stand-in for the engine's vLLM-style API."""

import json
import sys
import threading
import types
from dataclasses import dataclass

import pytest
from evalkit import BUILDERS, SYNTH_EXPECTED

import pixtral
from pixtral.eval.backends import LocalBackend
from pixtral.eval.errors import BackendError


@dataclass
class SamplingParams:
    temperature: float = 1.0
    max_tokens: int = 16


class FakeLLM:
    """Answers synth questions from a table; records every `chat` call."""

    instances: list = []

    def __init__(self, path=None):
        self.path = path
        self.calls = []
        self.lock = threading.Lock()
        FakeLLM.instances.append(self)

    def chat(self, conversations, params):
        with self.lock:
            self.calls.append((len(conversations), params))
        outputs = []
        for messages in conversations:
            question = messages[-1]["content"]
            question = question if isinstance(question, str) else question[-1]["text"]
            assert messages[0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
            if question == "Color?":
                raise RuntimeError("engine hiccup")
            reply = self.replies.get(question, "?")
            outputs.append(types.SimpleNamespace(outputs=[types.SimpleNamespace(text=reply)]))
        return outputs


@pytest.fixture
def fake_engine(monkeypatch):
    FakeLLM.instances = []
    monkeypatch.setattr(pixtral, "LLM", FakeLLM, raising=False)
    monkeypatch.setattr(pixtral, "SamplingParams", SamplingParams, raising=False)
    return FakeLLM


def test_local_model_runs_batched_in_process(tmp_path, run_cli, fake_engine):
    data, replies = BUILDERS["synth"](tmp_path / "data")
    fake_engine.replies = replies
    out = tmp_path / "out"
    code, _, err = run_cli("synth", "--data", str(data), "--model", "/ckpt/tiny", "--output-dir", str(out),
                           "--concurrency", "4", "--no-progress")
    assert code == 0, err
    llm = fake_engine.instances[0]
    assert llm.path == "/ckpt/tiny"
    assert all(p.temperature == 0.0 and p.max_tokens == 64 for _, p in llm.calls)
    assert max(n for n, _ in llm.calls) > 1  # requests were batched
    result = json.loads((out / "synth.json").read_text())
    # "Color?" makes the engine raise: its batch is retried one by one and only that item fails.
    assert result["counts"]["failed"] == 1
    rows = [json.loads(line) for line in (out / "synth.items.jsonl").read_text().splitlines()]
    failed = [r for r in rows if r["status"] == "failed"]
    assert [r["meta"]["question"] for r in failed] == ["Color?"] and "engine hiccup" in failed[0]["error"]
    assert result["metrics"]["baseline"] == pytest.approx(SYNTH_EXPECTED["metrics"]["baseline"])
    assert result["settings"]["model"] == {"kind": "local", "model": "/ckpt/tiny", "max_batch": 4}


def test_default_model_when_no_model_or_endpoint(tmp_path, fake_engine):
    fake_engine.replies = {}
    backend = LocalBackend(None)
    try:
        assert fake_engine.instances[0].path is None and backend.identity == {"model": "default"}
    finally:
        backend.close()


def test_missing_engine_is_a_clear_error(tmp_path, run_cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "pixtral", types.ModuleType("pixtral"))  # a pixtral without LLM
    data, _ = BUILDERS["synth"](tmp_path / "data")
    code, _, err = run_cli("synth", "--data", str(data), "--output-dir", str(tmp_path / "out"))
    assert code == 1
    assert "in-process engine is not available" in err and "--endpoint URL --served-model NAME" in err
    with pytest.raises(BackendError):
        LocalBackend("x")
