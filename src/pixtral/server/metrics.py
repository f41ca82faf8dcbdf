"""`GET /metrics`: engine and server counters in the Prometheus text format."""

from __future__ import annotations

from collections import Counter

from pixtral.engine.engine import EngineStats

# name, type, help, EngineStats field
ENGINE_METRICS = [
    ("pixtral_requests_waiting", "gauge", "Requests waiting to be scheduled.", "num_waiting"),
    ("pixtral_requests_running", "gauge", "Requests being prefilled or decoded.", "num_running"),
    ("pixtral_kv_blocks_used", "gauge", "KV-cache blocks held by requests.", "kv_blocks_used"),
    ("pixtral_kv_blocks_cached", "gauge", "KV-cache blocks findable by the prefix cache (used or free).",
     "kv_blocks_cached"),
    ("pixtral_kv_blocks_total", "gauge", "KV-cache blocks in all.", "kv_blocks_total"),
    ("pixtral_kv_block_size", "gauge", "Tokens per KV-cache block.", "block_size"),
    ("pixtral_prompt_tokens_total", "counter", "Prompt tokens run through the model.", "prompt_tokens_total"),
    ("pixtral_generation_tokens_total", "counter", "Tokens generated.", "generation_tokens_total"),
    ("pixtral_prefix_cache_hit_tokens_total", "counter", "Prompt tokens served from the prefix cache.",
     "prefix_cache_hit_tokens_total"),
    ("pixtral_encoder_cache_hits_total", "counter", "Image features reused from the encoder cache.",
     "encoder_cache_hits_total"),
    ("pixtral_images_encoded_total", "counter", "Images run through the vision encoder.", "images_encoded_total"),
    ("pixtral_preemptions_total", "counter", "Requests preempted for lack of KV blocks.", "preemptions_total"),
    ("pixtral_engine_steps_total", "counter", "Engine steps run.", "steps_total"),
]


def render(stats: EngineStats | None, errors: Counter, ready: bool) -> str:
    lines = ["# HELP pixtral_ready Whether the model is loaded and the engine is running.",
             "# TYPE pixtral_ready gauge", f"pixtral_ready {int(ready)}"]
    if stats is not None:
        for name, kind, help_text, field in ENGINE_METRICS:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {getattr(stats, field)}"]
        lines += ["# HELP pixtral_requests_finished_total Requests finished, by reason.",
                  "# TYPE pixtral_requests_finished_total counter"]
        for reason in sorted(set(stats.requests_finished_total) | {"stop", "length", "abort", "error"}):
            lines.append(f'pixtral_requests_finished_total{{reason="{reason}"}} '
                         f"{stats.requests_finished_total.get(reason, 0)}")
    lines += ["# HELP pixtral_http_errors_total Requests answered with an error, by status.",
              "# TYPE pixtral_http_errors_total counter"]
    for status in sorted(errors):
        lines.append(f'pixtral_http_errors_total{{status="{status}"}} {errors[status]}')
    return "\n".join(lines) + "\n"
