"""/metrics through prometheus_client: request histograms and token counters move by exactly what was sent."""

from __future__ import annotations

import httpx
import openai
import pytest
from live_server import MODEL_NAME, metrics, start, wait_idle
from prometheus_client.parser import text_string_to_metric_families
from tiny_model import image_uri, user

from pixtral.engine import EngineConfig

HISTOGRAMS = ("pixtral_time_to_first_token_seconds", "pixtral_time_per_output_token_seconds",
              "pixtral_e2e_request_latency_seconds", "pixtral_request_queue_time_seconds")


@pytest.fixture(scope="module")
def live(model, processor):
    live, engine = start(model, processor, EngineConfig(num_blocks=256))  # its own counters
    yield live
    live.stop()
    engine.shutdown()


def test_metrics_parse_with_the_expected_types(live):
    families = {f.name: f.type for f in text_string_to_metric_families(httpx.get(f"{live.url}/metrics").text)}
    assert all(families[name] == "histogram" for name in HISTOGRAMS)
    for name in ("pixtral_prompt_tokens", "pixtral_image_tokens", "pixtral_generation_tokens",
                 "pixtral_prompt_tokens_by_source", "pixtral_prefix_cache_hits", "pixtral_num_preemptions",
                 "pixtral_request_success", "pixtral_encoder_cache_hits", "pixtral_images_encoded",
                 "pixtral_engine_steps"):
        assert families[name] == "counter", name
    for name in ("pixtral_ready", "pixtral_num_requests_running", "pixtral_num_requests_waiting",
                 "pixtral_kv_blocks_used", "pixtral_kv_blocks_cached", "pixtral_kv_blocks_total",
                 "pixtral_kv_block_size", "pixtral_kv_cache_usage_perc"):
        assert families[name] == "gauge", name


def test_histograms_and_token_counters_count_each_request_once(live):
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=60)
    before = wait_idle(live.url)
    extra = {"ignore_eos": True}  # every request generates max_tokens tokens: 2+, so each has a time per token
    usages = []
    for messages, max_tokens in [([user("Hello there.")], 3), ([user("What is this?", image_uri(7))], 5)]:
        resp = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=max_tokens,
                                              temperature=0, extra_body=extra)
        usages.append(resp.usage)
    stream = client.chat.completions.create(model=MODEL_NAME, messages=[user("Count.", image_uri(8, (48, 40)))],
                                            max_tokens=4, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body=extra)
    usages += [chunk.usage for chunk in stream if chunk.usage is not None]
    assert len(usages) == 3 and [u.completion_tokens for u in usages] == [3, 5, 4]

    after = wait_idle(live.url)

    def moved(name):
        return after.get(name, 0) - before.get(name, 0)

    for name in HISTOGRAMS:
        assert moved(f"{name}_count") == 3, name
        assert moved(f'{name}_bucket{{le="+Inf"}}') == 3, name
        assert moved(f"{name}_sum") >= 0, name
    # Real timestamps, one request at a time: queued <= first token <= finished.
    assert 0 < moved("pixtral_time_to_first_token_seconds_sum") <= moved("pixtral_e2e_request_latency_seconds_sum")
    assert moved("pixtral_request_queue_time_seconds_sum") <= moved("pixtral_time_to_first_token_seconds_sum")
    assert moved("pixtral_prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert moved("pixtral_generation_tokens_total") == sum(u.completion_tokens for u in usages)
    image_tokens = [u.prompt_tokens_details.image_tokens for u in usages]
    assert image_tokens[0] == 0 and all(n > 0 for n in image_tokens[1:])
    assert moved("pixtral_image_tokens_total") == sum(image_tokens)
    assert moved('pixtral_request_success_total{finished_reason="length"}') == 3
    computed = moved('pixtral_prompt_tokens_by_source_total{source="local_compute"}')
    cached = moved('pixtral_prompt_tokens_by_source_total{source="local_cache_hit"}')
    assert computed + cached == sum(u.prompt_tokens for u in usages)  # no preemption here: each prompt ran once


def test_http_errors_are_counted_by_status(live):
    before = metrics(live.url).get('pixtral_http_errors_total{status="404"}', 0)
    assert httpx.get(f"{live.url}/nowhere").status_code == 404
    assert metrics(live.url)['pixtral_http_errors_total{status="404"}'] == before + 1
