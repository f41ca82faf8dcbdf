"""`pixtral serve --quantization int8` as a real process: it answers as the engine over the same
quantized model does (official openai client), and `/v1/models` and `/metrics` say what it runs."""

from __future__ import annotations

import httpx
import pytest
from live_server import MODEL_NAME, ServeProcess, metrics
from tiny_model import image_uri, user

from pixtral.engine import LLM
from pixtral.generation import SamplingParams

QUESTIONS = [[user("Hello! What can you do?")], [user("What is in this picture?", image_uri(7))]]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    live = ServeProcess(tiny_dir, tmp_path_factory.mktemp("q_server") / "server.log", "--quantization", "int8")
    yield live
    live.stop()


def test_greedy_answers_equal_the_quantized_engine(server, tiny_dir):
    llm = LLM(tiny_dir, quantization="int8")
    expected = [o.outputs[0].text for o in llm.chat(QUESTIONS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))]
    for messages, text in zip(QUESTIONS, expected):
        reply = server.client.chat.completions.create(model=MODEL_NAME, messages=messages, temperature=0,
                                                      max_tokens=MAX_TOKENS)
        assert reply.choices[0].message.content == text


def test_models_and_metrics_report_the_quantization(server, model):
    (card,) = server.client.models.list().data
    assert (card.id, card.quantization, card.quantization_source, card.dtype, card.tensor_parallel_size) == (
        MODEL_NAME, "int8", "on load", "float32", 1)
    values = metrics(server.url)
    assert values['pixtral_model_info{dtype="float32",quantization="int8",quantization_source="on load",'
                  'tensor_parallel_size="1"}'] == 1
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert 0 < values["pixtral_model_weight_bytes"] < float_bytes


def test_an_unquantized_server_says_so(tiny_dir, tmp_path):
    live = ServeProcess(tiny_dir, tmp_path / "server.log")
    try:
        card = httpx.get(f"{live.url}/v1/models").json()["data"][0]
        assert card["quantization"] is None and card["quantization_source"] is None
        assert metrics(live.url)['pixtral_model_info{dtype="float32",quantization="none",quantization_source="none",'
                                 'tensor_parallel_size="1"}'] == 1
    finally:
        live.stop()
