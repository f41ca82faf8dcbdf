"""The engine: requests in, one batched step at a time, token outputs out.

The layers, top down:

    Scheduler        which tokens of which requests run this step (`Chunk`s)
    KVCacheManager   each request's block table and block hashes; prefix-cache hits
    BlockAllocator   blocks by id: reference counts, free list, the prefix cache's index
    ModelRunner      one forward pass over the step's chunks (and the images they need)
    Sampler          a token for every chunk that reaches its sequence's end
    OutputProcessor  text and stop strings, outside the step loop (`LLM`, `AsyncEngine`)

Each `step()` schedules, runs the model and samples: its outputs are tokens, logprobs and the
finish reasons the engine can see itself (stop ids, max_tokens, errors). Text is made apart
from the step loop, so detokenizing never holds up the next step; when a stop string matches,
the output processor ends the request with `finish_requests`. Finished and aborted requests
give their KV blocks back at once.

A request with `n` > 1 choices is n sequences (`request.child_ids`). Only the first computes the
prompt; the others wait until it has, then fork off it in the step that samples its first token:
each shares the prompt's full KV blocks and gets a copy of the partly filled last one
(`KVCacheManager.fork`), and samples its own first token from the same logits. So the prompt runs
once whether prefix caching is on or off, and no prompt token is recomputed. (Going through the
prefix cache instead, as vLLM v1 does, recomputes the last partial block per choice, and all of
the prompt for choices admitted in the same step.) A choice that finds no room then (the sequence
limit, or no free block) waits as a request of its own and recomputes the prompt, from the prefix
cache where it can.

The engine is synchronous and single-threaded;
`AsyncEngine` drives it from a background thread. Under tensor parallelism (`executor.py`) all of
this runs once, in the driver's process; only the model runner's forward passes and image
encodings run on every rank.
"""

from __future__ import annotations

import logging
import uuid
import weakref
from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from pixtral.engine.block_allocator import BlockAllocator
from pixtral.engine.chunk import Chunk
from pixtral.engine.config import EngineConfig
from pixtral.engine.encoder_cache import EncoderCache
from pixtral.engine.fusion import fuse
from pixtral.engine.executor import TensorParallelError
from pixtral.engine.kv_cache import PagedKVCache, engine_num_blocks
from pixtral.engine.kv_cache_manager import KVCacheManager
from pixtral.engine.model_runner import ModelRunner
from pixtral.engine.outputs import OutputDelta, TokenLogprob
from pixtral.engine.request import Prompt, Request, Status, child_ids
from pixtral.engine.sampler import Sampler
from pixtral.engine.scheduler import Scheduler
from pixtral.errors import RequestError
from pixtral.generation.generate import max_new_tokens
from pixtral.generation.params import SamplingParams
from pixtral.generation.sampling import stop_token_ids
from pixtral.structured import grammar_tokenizer
from pixtral.structured.masks import GrammarError, MaskBatch, Masker, advance

log = logging.getLogger("pixtral.engine")


@dataclass
class EngineStats:
    num_waiting: int = 0
    num_running: int = 0
    kv_blocks_used: int = 0
    kv_blocks_cached: int = 0
    kv_blocks_total: int = 0
    block_size: int = 0
    prompt_tokens_total: int = 0  # prompt tokens run through the model (prefix-cache hits excluded)
    generation_tokens_total: int = 0
    prefix_cache_hit_tokens_total: int = 0
    encoder_cache_hits_total: int = 0
    images_encoded_total: int = 0
    preemptions_total: int = 0
    steps_total: int = 0
    requests_finished_total: dict[str, int] = field(default_factory=dict)  # by finish reason


class Engine:
    def __init__(self, model, processor, config: EngineConfig | None = None, executor=None):
        """`executor`: a `TensorParallelExecutor` whose workers hold the other ranks of `model`
        (rank 0's part); every forward pass then runs on every rank (see `executor.py`)."""
        self.model, self.processor = model, processor
        self.device, self.dtype = model.device, model.dtype
        self.config = cfg = (config or EngineConfig()).resolved(self.device)
        self.executor = executor
        if executor is not None and cfg != executor.config:
            raise ValueError("the engine's config differs from the one its tensor-parallel workers were given")
        if self.device.type == "cuda":
            fuse(model, projections=cfg.fuse_projections, kernels=cfg.triton_kernels)

        if executor is not None:
            executor.wait_loaded()  # every rank loaded: the KV-cache sizing below may be a collective
        num_blocks = engine_num_blocks(model, cfg)
        if executor is not None:
            num_blocks = executor.agree_num_blocks(num_blocks)
        self.cache = PagedKVCache(model.args, num_blocks, cfg.block_size, self.device, self.dtype)
        self.allocator = BlockAllocator(num_blocks, cfg.enable_prefix_caching)
        self.kv = KVCacheManager(self.allocator, cfg.block_size)
        self.scheduler = Scheduler(cfg, self.kv)
        self.kv_capacity = self.kv.num_blocks * cfg.block_size  # tokens
        self.max_model_len = min(model.args.max_seq_len, cfg.max_model_len or model.args.max_seq_len)
        self.encoder_cache = EncoderCache(cfg.encoder_cache_tokens, track_evictions=executor is not None)
        runner_len = min(self.max_model_len, self.kv_capacity)
        if executor is None:
            self.runner = ModelRunner(model, self.cache, cfg, runner_len)
        else:
            self.runner = executor.make_runner(model, self.cache, cfg, runner_len)
            self.runner.encoder_cache = self.encoder_cache  # its evictions go to the workers
            executor.wait_ready(self.runner.graph_plan())
            weakref.finalize(self, executor.close)  # an engine dropped without close() still stops its workers
        self.sampler = Sampler()
        self._masker: Masker | None = None  # started with the first constrained request
        self.requests: dict[str, Request] = {}  # by the engine's ids (one per choice)
        self._choices: dict[str, list[Request]] = {}  # a request of n > 1 choices: its sequences, by its id
        self._forks: dict[str, list[Request]] = {}  # first choice's id -> the choices waiting for its prompt
        self.eos_id = processor.eos_id
        self.image_token_id = model.image_token_id
        self.image_related_ids = set((getattr(processor, "image_token_ids", None) or {}).values())
        self._generated = 0
        self._prompt_tokens = 0
        self._images_encoded = 0
        self._steps = 0
        self._finished: Counter[str] = Counter({"stop": 0, "length": 0, "abort": 0, "error": 0})
        # Requests the engine ended itself, with the reason counted. The output processor may end
        # one otherwise (a stop string in its last token): `finish_requests` then counts it again
        # under the end its client saw. A few steps' worth is enough: it is told a step or two later.
        self._ended: OrderedDict[str, str] = OrderedDict()
        self._ended_limit = 8 * cfg.max_num_seqs

    # ------------------------------------------------------------------ requests
    def check(self, prompt: Prompt, params: SamplingParams) -> tuple[int, list[int]]:
        """Validate a request without adding it: -> (max new tokens, image tokens per image).

        Raises RequestError / ContextLengthError with a message meant for the user. Touches no
        engine state, so any thread may call it.
        """
        params.validate()
        if params.structured_output is not None:  # compiled here, off the step loop (kept: add_request reuses it)
            params.structured_output.compile(grammar_tokenizer(self.processor))
        ids = prompt.token_ids
        vocab = self.model.args.vocab_size
        if params.n > self.config.max_num_seqs:
            raise RequestError(f"'n' = {params.n} is over the {self.config.max_num_seqs} sequences this engine "
                               "runs at once (max_num_seqs)")
        outside = next((t for t in params.logit_bias or () if t >= vocab), None)
        if outside is not None:
            raise RequestError(f"'logit_bias': token id {outside} is not in the vocabulary (ids 0 to {vocab - 1})")
        if not isinstance(ids, list) or not ids:
            raise RequestError("the prompt is empty")
        if not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
            raise RequestError(f"prompt token ids must be integers in [0, {vocab})")
        counts: list[int] = []
        n_slots = sum(t == self.image_token_id for t in ids) if self.image_token_id is not None else 0
        if prompt.images:
            if self.model.args.vision is None:
                raise RequestError("this model has no vision encoder, but the request has images")
            try:
                counts = self.model.image_token_counts(prompt.images)
            except ValueError as exc:
                raise RequestError(f"invalid image: {exc}") from None
        if n_slots != sum(counts):
            raise RequestError(
                f"the prompt has {n_slots} [IMG] tokens but its {len(counts)} image(s) fill {sum(counts)}; "
                "encode prompts and images together with the processor"
            )
        limit, what = self.max_model_len, f"the model's context length is {self.max_model_len}"
        if self.kv_capacity < limit:
            limit, what = self.kv_capacity, (f"the KV cache holds only {self.kv_capacity} tokens "
                                             "(give the engine more KV-cache memory)")
        return max_new_tokens(len(ids), params, limit, what), counts

    def add_request(self, prompt: Prompt, params: SamplingParams, request_id: str | None = None) -> str:
        max_new, counts = self.check(prompt, params)
        request_id = request_id or uuid.uuid4().hex
        ids = child_ids(request_id, params.n)
        if request_id in self._choices or any(i in self.requests for i in ids):
            raise RequestError(f"request id {request_id!r} is already in use")
        grammar = (params.structured_output.compile(grammar_tokenizer(self.processor))
                   if params.structured_output is not None else None)
        choices = [Request(cid, prompt, params, max_new_tokens=max_new, image_token_id=self.image_token_id,
                           image_token_counts=counts, stop_ids=stop_token_ids(params, self.eos_id),
                           image_related_ids=self.image_related_ids, parent_id=request_id, index=i,
                           matcher=grammar.matcher() if grammar is not None else None)
                   for i, cid in enumerate(ids)]
        first = choices[0]
        self.requests[first.request_id] = first
        self.scheduler.add(first)
        if params.n > 1:
            self._choices[request_id] = choices
            self._forks[first.request_id] = choices[1:]
        return request_id

    def abort(self, request_id: str) -> bool:
        """Stop a request (all its choices) now and free its KV blocks. False if it is unknown or already done.
        `request_id` is the client's id, or the engine's id of one choice."""
        choices = self._choices.pop(request_id, None)
        ids = [c.request_id for c in choices] if choices is not None else [request_id]
        aborted = False
        for rid in ids:
            for choice in self._forks.pop(rid, []):  # waiting for the prompt: never scheduled
                choice.status, choice.finish_reason = Status.FINISHED, "abort"
                self._finished["abort"] += 1
            req = self.requests.pop(rid, None)
            if req is not None:
                self.scheduler.finish(req)
                req.finish_reason = "abort"
                self._finished["abort"] += 1
                self._forget_choices(req.parent_id)
                aborted = True
        return aborted

    def finish_requests(self, request_ids: Iterable[str], reason: str) -> None:
        """End requests for a reason found outside the step loop (a stop string, a failure to make
        text): free their KV blocks now and count them under `reason`.

        A request the engine already ended itself (its last token was in flight) is counted again
        under `reason`, the end its client saw. Ids it does not know (aborted) are skipped.
        """
        for request_id in request_ids:
            req = self.requests.get(request_id)
            if req is not None:
                req.finish_reason = reason
                self._finish(req)
                continue
            counted = self._ended.pop(request_id, None)
            if counted is not None and counted != reason:
                self._finished[counted] -= 1
                self._finished[reason] += 1

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ------------------------------------------------------------------ one step
    @torch.inference_mode()
    def step(self) -> list[OutputDelta]:
        """Schedule, run the model, sample -> token-level deltas (no text: see `OutputProcessor`).

        Never raises: a failure fails only the requests it can be traced to (each gets an error
        delta) and the engine goes on with the others."""
        try:
            chunks = self.scheduler.schedule()
        except Exception as exc:  # noqa: BLE001 - scheduler state is shared: start clean, without these
            log.exception("scheduling failed; failing every request the engine holds")
            return self._fail(list(self.requests.values()), exc)
        if not chunks:
            return []
        self._steps += 1
        try:
            return self._run_step(chunks)
        except TensorParallelError:  # a rank is gone or out of step: the engine cannot go on
            raise
        except Exception as exc:  # noqa: BLE001 - a bug past the per-request handling below
            log.exception("engine step failed")
            return self._fail([c.request for c in chunks if not c.request.finished], exc)

    def _run_step(self, chunks: list[Chunk]) -> list[OutputDelta]:
        masks = self._start_masks(chunks)  # computed while the model runs
        chunks, logits, deltas = self._forward(chunks)
        for c in chunks:
            self.scheduler.computed(c)
            self._prompt_tokens += max(0, min(c.end, c.request.prompt_len) - c.start)
        logits, prompt_logits = self._split_logits(chunks, logits)
        if prompt_logits is not None:
            self._prompt_logprobs(chunks, prompt_logits)
        sampling = [c.request for c in chunks if c.samples]
        if not sampling:
            return deltas
        sampling, logits = self._fork(sampling, logits)
        try:
            tokens, logprobs, errors = self.sampler(logits, sampling, masks)
        except Exception:  # noqa: BLE001 - find the rows at fault: sample each alone
            log.exception("sampling a batch of %d failed; sampling each row alone", len(sampling))
            tokens, logprobs, errors = self._sample_each(logits, sampling, masks)
        for i, req in enumerate(sampling):
            if i in errors:
                deltas += self._fail([req], errors[i])
                continue
            try:  # the grammar takes the token (once: recomputing after a preemption samples nothing)
                complete = req.matcher is not None and advance(req.matcher, tokens[i])
            except GrammarError as exc:
                deltas += self._fail([req], exc)
                continue
            delta = req.append_token(tokens[i], logprobs[i], complete)
            self._generated += 1
            if delta.finished:
                self._finish(req)
            deltas.append(delta)
        return deltas

    @staticmethod
    def _split_logits(chunks: list[Chunk], logits: torch.Tensor | None
                      ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The runner's rows -> (one row per sampling chunk, the prompt-logprob rows or None)."""
        n_sample = sum(c.samples for c in chunks)
        if logits is None or logits.shape[0] == n_sample:
            return logits, None
        return logits[:n_sample], logits[n_sample:]

    def _prompt_logprobs(self, chunks: list[Chunk], logits: torch.Tensor) -> None:
        """Keep the logprob (and the top alternatives) of each prompt token the chunks' logits predict."""
        positions = [(c.request, p) for c in chunks for p in c.prompt_logit_positions]
        targets = torch.tensor([req.token_ids[p + 1] for req, p in positions], device=logits.device)
        logp = torch.log_softmax(logits.float(), dim=-1)
        chosen = logp.gather(1, targets[:, None])[:, 0].tolist()
        k = max(req.params.prompt_logprobs for req, _ in positions)
        top_values, top_ids = torch.topk(logp, k, dim=-1)
        top_values, top_ids = top_values.tolist(), top_ids.tolist()
        for j, (req, p) in enumerate(positions):
            n = req.params.prompt_logprobs
            req.prompt_logprobs[p + 1] = TokenLogprob(req.token_ids[p + 1], chosen[j],
                                                      list(zip(top_ids[j][:n], top_values[j][:n])))

    def _fork(self, sampling: list[Request], logits: torch.Tensor) -> tuple[list[Request], torch.Tensor]:
        """Fork the choices waiting for a prompt that this step finished: each shares its blocks and
        samples from its logits row (-> the sampling requests and their rows, the forked ones added)."""
        rows = list(range(len(sampling)))
        for j, first in enumerate(list(sampling)):
            for choice in self._forks.pop(first.request_id, []):
                self.requests[choice.request_id] = choice
                copies = (self.kv.fork(first, choice, first.prompt_len, reserve=self.scheduler.watermark)
                          if self.scheduler.has_room else None)
                if copies is None:  # no room now: it computes its prompt itself, when it can
                    self.scheduler.add(choice)
                    continue
                choice.num_cached_tokens = first.num_cached_tokens  # its usage: the prompt's, as computed once
                self.runner.copy_blocks(copies)
                self.scheduler.add_forked(choice, first.prompt_len)
                sampling.append(choice)
                rows.append(j)
        return sampling, (logits if len(rows) == logits.shape[0] else logits[rows])

    def _forward(self, chunks: list[Chunk]) -> tuple[list[Chunk], torch.Tensor | None, list[OutputDelta]]:
        """Run the step's chunks -> (the chunks that ran, their logits, error deltas of those that failed).

        All chunks go in one pass. If it fails, each chunk runs alone, so that only the requests at
        fault fail (an image the encoder cannot take, a numerical fault); writing a chunk's keys and
        values again gives the same cache, so the retries are safe.
        """
        try:
            return chunks, self.runner.forward(chunks, self._image_features(chunks)), []
        except TensorParallelError:
            raise
        except Exception as exc:  # noqa: BLE001
            if len(chunks) == 1:
                log.exception("engine step failed")
                return [], None, self._fail([chunks[0].request], exc)
            log.exception("a step of %d chunks failed; running each alone", len(chunks))
        ran, rows, prompt_rows, deltas = [], [], [], []
        for c in chunks:
            try:
                logits = self.runner.forward([c], self._image_features([c]))
            except TensorParallelError:
                raise
            except Exception as exc:  # noqa: BLE001
                deltas += self._fail([c.request], exc)
                continue
            ran.append(c)
            if c.samples:  # its sampling row first, then its prompt-logprob rows (see `ModelRunner.forward`)
                rows.append(logits[:1])
                logits = logits[1:]
            prompt_rows.append(logits)
        rows += prompt_rows
        return ran, (torch.cat(rows) if rows else None), deltas

    def _start_masks(self, chunks: list[Chunk]) -> MaskBatch | None:
        """Begin the grammar masks of the constrained sequences that sample this step, and of the choices
        that may fork off them (in a background thread, while the forward pass runs)."""
        matchers = {}
        for c in chunks:
            if c.samples:
                for req in [c.request, *self._forks.get(c.request.request_id, ())]:
                    if req.matcher is not None:
                        matchers[req.request_id] = req.matcher
        if not matchers:
            return None
        if self._masker is None:
            self._masker = Masker(self.processor.vocab_size)
        return self._masker.start(matchers)

    def _sample_each(self, logits: torch.Tensor, requests: list[Request], masks: MaskBatch | None = None
                     ) -> tuple[list[int | None], list, dict[int, Exception]]:
        tokens, logprobs, errors = [None] * len(requests), [None] * len(requests), {}
        for i, req in enumerate(requests):
            try:
                (tokens[i],), (logprobs[i],), row_errors = self.sampler(logits[i: i + 1], [req], masks)
            except Exception as exc:  # noqa: BLE001
                errors[i] = exc
                continue
            if row_errors:
                errors[i] = row_errors[0]
        return tokens, logprobs, errors

    def _image_features(self, chunks: list[Chunk]) -> dict[bytes, torch.Tensor]:
        """Features of every image this step's chunks touch: cached, or encoded in one packed pass."""
        features: dict[bytes, torch.Tensor] = {}
        missing: dict[bytes, torch.Tensor] = {}
        for c in chunks:
            req = c.request
            for k in req.images_for_rows(*req.image_rows(c.start, c.end)):
                key = req.image_hashes[k]
                if key in features or key in missing:
                    continue
                cached = self.encoder_cache.get(key)
                if cached is None:
                    missing[key] = req.images[k]
                else:
                    features[key] = cached
        if missing:
            for key, feats in zip(missing, self.runner.encode_images(list(missing.values()), list(missing))):
                features[key] = feats
                self.encoder_cache.put(key, feats)
            self._images_encoded += len(missing)
        return features

    def _finish(self, req: Request) -> None:
        self.requests.pop(req.request_id, None)
        self.scheduler.finish(req)
        self._forget_choices(req.parent_id)
        self._finished[req.finish_reason] += 1
        self._ended[req.request_id] = req.finish_reason
        if len(self._ended) > self._ended_limit:
            self._ended.popitem(last=False)

    def _forget_choices(self, request_id: str) -> None:
        """Drop the record of a request's choices once every one has ended."""
        choices = self._choices.get(request_id)
        if choices is not None and all(c.finished for c in choices):
            del self._choices[request_id]

    def _fail(self, requests: list[Request], exc: Exception) -> list[OutputDelta]:
        """End these requests with an error: the request's own fault (a RequestError) or ours."""
        if isinstance(exc, RequestError):
            code, message = "invalid_request", str(exc)
        else:
            code, message = "internal_error", f"internal error: {type(exc).__name__}: {exc}"
        deltas = []
        # The choices still waiting for a failed request's prompt fail with it.
        waiting = [choice for req in requests for choice in self._forks.pop(req.request_id, [])]
        for choice in waiting:
            choice.status = Status.FINISHED  # never scheduled: nothing to take back from the scheduler
        requests = requests + waiting
        for req in requests:
            req.finish_reason = "error"
            try:
                self._finish(req)
            except Exception:  # noqa: BLE001 - its blocks stay lost, but the request still ends
                log.exception("could not free request %s", req.request_id)
                self.requests.pop(req.request_id, None)
            deltas.append(req.fill(OutputDelta(req.request_id, error=message, error_code=code)))
        return deltas

    # ------------------------------------------------------------------ introspection
    def model_info(self) -> dict:
        """What the engine runs: dtype, quantization (scheme, and whether the checkpoint stored it or it
        was applied on load), tensor-parallel size, and the bytes of rank 0's weights."""
        model = self.model
        return {
            "dtype": str(self.dtype).removeprefix("torch."),
            "quantization": getattr(model, "quantization", None),
            "quantization_source": getattr(model, "quantization_source", None),
            "tensor_parallel_size": self.config.tensor_parallel_size,
            "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        }

    def stats(self) -> EngineStats:
        return EngineStats(
            num_waiting=len(self.scheduler.waiting),
            num_running=len(self.scheduler.running),
            kv_blocks_used=self.kv.num_used_blocks,
            kv_blocks_cached=self.kv.num_cached_blocks,
            kv_blocks_total=self.kv.num_blocks,
            block_size=self.config.block_size,
            prompt_tokens_total=self._prompt_tokens,
            generation_tokens_total=self._generated,
            prefix_cache_hit_tokens_total=self.scheduler.prefix_hit_tokens,
            encoder_cache_hits_total=self.encoder_cache.hits,
            images_encoded_total=self._images_encoded,
            preemptions_total=self.scheduler.num_preemptions,
            steps_total=self._steps,
            requests_finished_total=dict(self._finished),
        )

    @torch.inference_mode()
    def warmup(self) -> None:
        """GPU: capture the common decode graphs now (on every rank), so that first requests do not wait for it."""
        self.runner.capture_graphs()

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any (idempotent; nothing to do with one process)."""
        if self._masker is not None:
            self._masker.close()
        if self.executor is not None:
            self.runner.release_graphs()
            self.executor.close()

    def reset_prefix_cache(self) -> None:
        """Forget cached prefixes and image features (benchmarks)."""
        self.kv.reset_prefix_cache()
        self.encoder_cache.clear()
