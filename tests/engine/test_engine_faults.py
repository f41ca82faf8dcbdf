"""A request the engine cannot serve fails alone: the others of its batch give the answers they give
alone, and the engine keeps serving. The faults: a model that raises on one token or one image
(as a bug or a device error would), a token whose embedding is NaN, and sampling values at the
ends of their ranges."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_model import image_uri, user

from pixtral.engine import LLM
from pixtral.errors import RequestError
from pixtral.generation import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
NAN_TOKEN = 5000
FAULT_TOKEN = 6000
FAULT_IMAGE = (40, 40)  # preprocessed to 48 x 48, the size the faulty vision encoder fails on


@pytest.fixture(scope="module")
def llm(model, processor):
    return LLM.from_model(model, processor, num_blocks=256, block_size=16, max_num_batched_tokens=64)


@pytest.fixture(scope="module")
def nan_llm(model, processor):
    """The tiny model with one token's embedding set to NaN: any sequence holding it computes NaN."""
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.tok_embeddings.weight[NAN_TOKEN] = float("nan")
    return LLM.from_model(broken, processor, num_blocks=64, block_size=16)


def texts(outs):
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def faulty_llm(model, processor):
    """The tiny model with two faults built in: its embedding raises on FAULT_TOKEN, its vision
    encoder on a 48 x 48 image (as a bug or a device error would)."""
    faulty = copy.deepcopy(model)

    def embedding_fault(module, args):
        if bool((args[0] == FAULT_TOKEN).any()):
            raise RuntimeError("embedding fault")

    def vision_fault(module, args):
        images = args[0]
        if any(tuple(img.shape[-2:]) == (48, 48) for img in images):
            raise RuntimeError("vision encoder fault")

    faulty.tok_embeddings.register_forward_pre_hook(embedding_fault)
    faulty.vision_encoder.register_forward_pre_hook(vision_fault)
    return LLM.from_model(faulty, processor, num_blocks=256, block_size=16, max_num_batched_tokens=64)


def test_a_fault_in_the_step_fails_only_its_request(faulty_llm, processor):
    good = [[user(f"Question {i}?", image_uri(i))] for i in range(3)]
    alone = texts(faulty_llm.chat(good, GREEDY))
    prompts = [dict(zip(("prompt_token_ids", "images"), processor.encode_chat(g))) for g in good]
    ids, images = processor.encode_chat([user("Question?", image_uri(9, FAULT_IMAGE))])
    bad_text = {"prompt_token_ids": [1, 22, FAULT_TOKEN, 33]}
    outs = faulty_llm.generate([prompts[0], {"prompt_token_ids": ids, "images": images}, prompts[1],
                                bad_text, prompts[2]], GREEDY)
    for i, what in ((1, "vision encoder fault"), (3, "embedding fault")):
        assert outs[i].error_code == "internal_error" and what in outs[i].error
        assert outs[i].outputs[0].finish_reason == "error"
    assert texts([outs[0], outs[2], outs[4]]) == alone
    assert faulty_llm.engine.allocator.num_used == 0  # every block came back
    assert texts(faulty_llm.chat(good, GREEDY)) == alone  # and the engine goes on


def test_nan_logits_fail_only_their_request_and_never_leak_into_others(nan_llm):
    clean = [[1, 22, 33, 44, 55], [1, 66, 77, 88], [1, 99, 111, 122, 133, 144]]
    alone = texts(nan_llm.generate(clean, GREEDY))
    poisoned = [1, 22, NAN_TOKEN, 44]
    outs = nan_llm.generate([clean[0], poisoned, clean[1], poisoned, clean[2]], GREEDY)
    for i in (1, 3):
        assert outs[i].error_code == "internal_error" and "non-finite logits" in outs[i].error
    assert texts([outs[0], outs[2], outs[4]]) == alone
    # Blocks the NaN requests wrote are reused now: stale NaNs must not reach anyone.
    assert texts(nan_llm.generate(clean * 3, GREEDY)) == alone * 3


EXTREMES = [
    dict(temperature=5e-324), dict(temperature=1e-300), dict(temperature=1e-5), dict(temperature=1.0000001e-5),
    dict(temperature=1.7976931348623157e308), dict(temperature=1e6),
    dict(top_p=5e-324), dict(top_p=1e-45), dict(top_p=1.0),
    dict(top_k=-1), dict(top_k=1), dict(top_k=131071), dict(top_k=131072), dict(top_k=2**63), dict(top_k=10**30),
    dict(seed=-(2**63)), dict(seed=2**64 - 1),
    dict(temperature=5e-324, top_p=5e-324, top_k=2**64, seed=2**64 - 1),
    dict(temperature=1e300, top_p=1e-300, top_k=10**30, seed=-(2**63)),
    dict(temperature=1e300, top_p=1e-300, top_k=10**30),
]


@pytest.mark.parametrize("values", EXTREMES, ids=lambda v: ",".join(f"{k}={v[k]:.3g}" for k in v))
def test_extreme_but_valid_sampling_values_sample_normally_beside_others(llm, values):
    others = [[user(f"Other {i}")] for i in range(3)]
    alone = texts(llm.chat(others, GREEDY))
    params = SamplingParams(max_tokens=6, logprobs=20, **values)
    outs = llm.chat([others[0], [user("Extreme")], others[1], others[2]], [GREEDY, params, GREEDY, GREEDY])
    assert outs[1].error is None and len(outs[1].outputs[0].token_ids) >= 1
    assert all(0 <= t < 131072 for t in outs[1].outputs[0].token_ids)
    assert texts([outs[0], outs[2], outs[3]]) == alone
    if values.get("temperature", 1) < 1e-5 or values.get("top_k") == 1 or values.get("top_p", 1) < 1e-30:
        greedy = texts(llm.chat([[user("Extreme")]], SamplingParams(temperature=0, max_tokens=6)))[0]
        assert outs[1].outputs[0].token_ids == greedy  # these are greedy by definition


@pytest.mark.parametrize("values, field", [
    (dict(temperature=-5e-324), "temperature"), (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=float("nan")), "temperature"), (dict(temperature=10**400), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.0000001), "top_p"), (dict(top_p=float("nan")), "top_p"),
    (dict(top_k=-2), "top_k"), (dict(seed=2**64), "seed"), (dict(seed=-(2**63) - 1), "seed"),
    (dict(max_tokens=0), "max_tokens"), (dict(logprobs=21), "logprobs"), (dict(logprobs=-1), "logprobs"),
    (dict(stop=["x"] * 65), "stop"), (dict(stop=["x" * 1001]), "stop"), (dict(stop_token_ids=[-1]), "stop_token_ids"),
])
def test_values_outside_the_ranges_are_refused_naming_the_field(values, field):
    with pytest.raises(RequestError, match=f"^'{field}'"):
        SamplingParams(**values)


def test_pixtral_eval_fails_only_the_conversation_the_engine_failed(faulty_llm, tiny_dir):
    from concurrent.futures import ThreadPoolExecutor

    from pixtral.eval.backends import LocalBackend, RequestFailed

    backend = LocalBackend(str(tiny_dir), max_batch=4, gather_s=0.5)
    backend.llm = faulty_llm  # the same engine code, over the faulty model
    good = [[user(f"Question {i}?", image_uri(i))] for i in range(3)]
    bad = [user("Question?", image_uri(9, FAULT_IMAGE))]
    expected = [o.outputs[0].text for o in faulty_llm.chat(good, SamplingParams(temperature=0, max_tokens=6))]

    def ask(messages):
        try:
            return backend.complete(messages, max_tokens=6, temperature=0.0)
        except RequestFailed as exc:
            return exc

    try:
        with ThreadPoolExecutor(4) as pool:  # one batch: the bad conversation among the good ones
            answers = list(pool.map(ask, [good[0], bad, good[1], good[2]]))
    finally:
        backend.close()
    assert isinstance(answers[1], RequestFailed) and "vision encoder fault" in str(answers[1])
    assert [answers[0], answers[2], answers[3]] == expected
