"""`GET /metrics`: engine, request and HTTP metrics in the Prometheus text format (`prometheus_client`).

Names are vLLM's where vLLM has the metric, with `pixtral_` in place of `vllm:` (so dashboards
built for vLLM need only the prefix changed). Each app has its own `CollectorRegistry`: several
servers can run in one process, and nothing lands in the process-wide registry.

Engine state (queue lengths, KV blocks, caches, steps, finished requests) is read from
`EngineStats` when scraped. Request timings come from the engine's timestamps
(`RequestMetrics`) and are observed once per request, when its last output reaches the server:

    time to first token   first token - arrival
    time per output token (finish - first token) / (generated tokens - 1), requests of 2+ tokens
    e2e request latency   finish - arrival
    request queue time    first scheduled - arrival

where arrival is when the engine took the request. Aborted requests (a client that went away)
have no last output and are not observed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pixtral.engine.async_engine import AsyncEngine
from pixtral.engine.outputs import OutputDelta, RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # what generate_latest writes
FINISH_REASONS = ("stop", "length", "abort", "error")

# vLLM's buckets.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0)

# name, help, EngineStats field
ENGINE_GAUGES = [
    ("pixtral_num_requests_running", "Requests being prefilled or decoded.", "num_running"),
    ("pixtral_num_requests_waiting", "Requests waiting to be scheduled.", "num_waiting"),
    ("pixtral_kv_blocks_used", "KV-cache blocks held by requests.", "kv_blocks_used"),
    ("pixtral_kv_blocks_cached", "KV-cache blocks findable by the prefix cache (used or free).", "kv_blocks_cached"),
    ("pixtral_kv_blocks_total", "KV-cache blocks in all.", "kv_blocks_total"),
    ("pixtral_kv_block_size", "Tokens per KV-cache block.", "block_size"),
]
ENGINE_COUNTERS = [  # names without the "_total" that prometheus_client adds
    ("pixtral_generation_tokens", "Tokens generated (a stop token included).", "generation_tokens_total"),
    ("pixtral_prefix_cache_hits", "Prefix-cache hits, in prompt tokens served from the cache.",
     "prefix_cache_hit_tokens_total"),
    ("pixtral_encoder_cache_hits", "Image features reused from the encoder cache.", "encoder_cache_hits_total"),
    ("pixtral_images_encoded", "Images run through the vision encoder.", "images_encoded_total"),
    ("pixtral_num_preemptions", "Requests preempted for lack of KV blocks.", "preemptions_total"),
    ("pixtral_engine_steps", "Engine steps run.", "steps_total"),
]


class EngineCollector(Collector):
    """Readiness, and the engine's gauges and counters as `EngineStats` has them when scraped."""

    def __init__(self, get_engine: Callable[[], AsyncEngine | None]):
        self.get_engine = get_engine

    def collect(self) -> Iterator[Metric]:
        engine = self.get_engine()
        yield GaugeMetricFamily("pixtral_ready", "Whether the model is loaded and the engine is running.",
                                value=int(engine is not None and engine.alive))
        if engine is None:
            return
        info = engine.model_info()
        model = GaugeMetricFamily("pixtral_model_info", "What the engine runs (labels); always 1.",
                                  labels=["dtype", "quantization", "quantization_source", "tensor_parallel_size"])
        model.add_metric([info["dtype"], info["quantization"] or "none", info["quantization_source"] or "none",
                          str(info["tensor_parallel_size"])], 1)
        yield model
        yield GaugeMetricFamily("pixtral_model_weight_bytes", "Bytes of the model's weights in this process "
                                "(rank 0's share under tensor parallelism).", value=info["weight_bytes"])
        stats = engine.stats()
        for name, help_text, field in ENGINE_GAUGES:
            yield GaugeMetricFamily(name, help_text, value=getattr(stats, field))
        yield GaugeMetricFamily("pixtral_kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                                value=stats.kv_blocks_used / stats.kv_blocks_total if stats.kv_blocks_total else 0.0)
        for name, help_text, field in ENGINE_COUNTERS:
            yield CounterMetricFamily(name, help_text, value=getattr(stats, field))
        by_source = CounterMetricFamily("pixtral_prompt_tokens_by_source",
                                        "Prompt tokens by source: computed by the model (again after a preemption), "
                                        "or found in the prefix cache.", labels=["source"])
        by_source.add_metric(["local_compute"], stats.prompt_tokens_total)
        by_source.add_metric(["local_cache_hit"], stats.prefix_cache_hit_tokens_total)
        yield by_source
        finished = CounterMetricFamily("pixtral_request_success", "Requests finished, by finish reason.",
                                       labels=["finished_reason"])
        for reason in sorted(set(stats.requests_finished_total) | set(FINISH_REASONS)):
            finished.add_metric([reason], stats.requests_finished_total.get(reason, 0))
        yield finished


class ServerMetrics:
    """One app's metrics: its registry, the request histograms and token counters, and HTTP errors."""

    def __init__(self, get_engine: Callable[[], AsyncEngine | None]):
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(get_engine))
        r = self.registry
        self.time_to_first_token = Histogram(
            "pixtral_time_to_first_token_seconds", "Time to first token (from arrival), in seconds.",
            buckets=TTFT_BUCKETS, registry=r)
        self.time_per_output_token = Histogram(
            "pixtral_time_per_output_token_seconds",
            "Time per output token after the first, per request of 2+ generated tokens, in seconds.",
            buckets=TPOT_BUCKETS, registry=r)
        self.e2e_request_latency = Histogram(
            "pixtral_e2e_request_latency_seconds", "End-to-end request latency (arrival to finish), in seconds.",
            buckets=REQUEST_LATENCY_BUCKETS, registry=r)
        self.request_queue_time = Histogram(
            "pixtral_request_queue_time_seconds", "Time from arrival to first scheduled, in seconds.",
            buckets=REQUEST_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter(
            "pixtral_prompt_tokens", "Prompt tokens of finished requests (prefix-cache hits included).", registry=r)
        self.image_tokens = Counter(
            "pixtral_image_tokens", "Prompt tokens of finished requests that stand for images.", registry=r)
        self.http_errors = Counter(
            "pixtral_http_errors", "Requests answered with an error, by status.", ["status"], registry=r)

    def http_error(self, status: int) -> None:
        self.http_errors.labels(status=str(status)).inc()

    def observe_finished(self, out: OutputDelta | RequestOutput) -> None:
        """Observe a finished request, once: from its last delta (streaming) or its whole output."""
        self.prompt_tokens.inc(out.num_prompt_tokens)
        self.image_tokens.inc(out.num_image_tokens)
        times, generated_tokens = out.metrics, out.num_generated_tokens
        if times is None:
            return
        if times.first_scheduled_time is not None:
            self.request_queue_time.observe(times.first_scheduled_time - times.arrival_time)
        if times.first_token_time is not None:
            self.time_to_first_token.observe(times.first_token_time - times.arrival_time)
            if times.finished_time is not None and generated_tokens > 1:
                self.time_per_output_token.observe(
                    (times.finished_time - times.first_token_time) / (generated_tokens - 1))
        if times.finished_time is not None:
            self.e2e_request_latency.observe(times.finished_time - times.arrival_time)

    def render(self) -> bytes:
        return generate_latest(self.registry)
