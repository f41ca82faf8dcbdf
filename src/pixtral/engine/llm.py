"""`LLM`: batched offline inference, in the convention of vLLM.

    from pixtral import LLM, SamplingParams
    llm = LLM("path/to/checkpoint")
    outs = llm.chat([[{"role": "user", "content": "Hi"}], ...], SamplingParams(temperature=0, max_tokens=64))
    print(outs[0].outputs[0].text)

All requests are checked first (a bad one raises before any work is done), then run together
through the engine with continuous batching; after each step the `OutputProcessor` makes the
text (and ends the requests whose stop strings matched). Results come back in input order.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from pixtral.engine.config import EngineConfig
from pixtral.engine.engine import Engine
from pixtral.engine.inputs import chat_prompt, generate_prompt
from pixtral.engine.output_processor import OutputProcessor
from pixtral.engine.outputs import OutputDelta, RequestOutput
from pixtral.engine.request import Prompt
from pixtral.errors import ConfigError, RequestError
from pixtral.generation.params import SamplingParams
from pixtral.processing.images import LOCAL_POLICY, ImagePolicy

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LLM:
    def __init__(self, path: str | Path | None = None, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, *, image_policy: ImagePolicy = LOCAL_POLICY,
                 quantization: str | None = None, **engine_options: Any):
        """Load a checkpoint (default: the model shipped with the package) and start an engine.

        `engine_options` are `EngineConfig` fields: max_num_seqs, max_num_batched_tokens, prefill_tokens_while_decoding,
        kv_cache_bytes, num_blocks, enable_prefix_caching, cuda_graphs, tensor_parallel_size, ...

        With `tensor_parallel_size=N` (N > 1) the model is split over N ranks: this process is rank 0
        and starts N - 1 worker processes (one per GPU, cuda:i..cuda:i+N-1 from `device`; on the CPU,
        N processes over gloo). Call `close()` (or use `with LLM(...) as llm:`) to stop them.

        `quantization`: "fp8" or "int8" quantizes the decoder's linear layers of a float checkpoint
        while it loads; a checkpoint stored quantized (fp8) loads as it is (see docs/quantization.md).
        """
        from pixtral.assets import default_model_dir
        from pixtral.checkpoint import load_model
        from pixtral.processing import load_processor

        path = Path(path) if path is not None else default_model_dir()
        device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
            dtype = DTYPES[dtype]
        size = engine_options.get("tensor_parallel_size", 1)
        if size == 1:
            model = load_model(path, device=device, dtype=dtype, quantization=quantization)
            self._setup(model, load_processor(path, image_policy), engine_options)
            return
        from pixtral.engine.executor import TensorParallelExecutor

        processor = load_processor(path, image_policy)  # a bad tokenizer fails before any process starts
        executor = TensorParallelExecutor.start(path, size, device, dtype, EngineConfig(**engine_options),
                                                quantization=quantization)
        try:
            self._setup(executor.model, processor, engine_options, executor)
        except BaseException:
            executor.close()
            raise

    @classmethod
    def from_model(cls, model, processor, **engine_options: Any) -> "LLM":
        """Wrap a model and processor already in memory."""
        if engine_options.get("tensor_parallel_size", 1) != 1:
            raise ConfigError("tensor parallelism needs a checkpoint path (each rank reads its own slices): "
                              "use LLM(path, tensor_parallel_size=N)")
        llm = cls.__new__(cls)
        llm._setup(model, processor, engine_options)
        return llm

    def _setup(self, model, processor, engine_options: dict[str, Any], executor=None) -> None:
        self.model, self.processor = model, processor
        self.engine = Engine(model, processor, EngineConfig(**engine_options), executor=executor)
        self.outputs = OutputProcessor(processor)
        self.engine.warmup()  # GPU: decode graphs captured now, not during the first requests

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Stop the tensor-parallel workers (idempotent; nothing to stop with one process)."""
        self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ------------------------------------------------------------------ API
    def chat(self, conversations: list[list[dict]] | list[dict],
             params: SamplingParams | list[SamplingParams] | None = None, *,
             image_policy: ImagePolicy | None = None) -> list[RequestOutput]:
        """One or many OpenAI-format conversations -> one RequestOutput each, in order."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]  # a single conversation
        limit = min(self.engine.max_model_len, self.engine.kv_capacity)
        prompts = [chat_prompt(self.processor, list(conv), image_policy, limit) for conv in conversations]
        return self._run(prompts, params)

    def generate(self, prompts: Any, params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Raw prompts (text, token ids, or dicts with token ids and images) -> RequestOutputs."""
        if isinstance(prompts, (str, dict, Prompt)) or (
                isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        return self._run([generate_prompt(self.processor, p) for p in prompts], params)

    def stream_chat(self, conversation: list[dict], params: SamplingParams | None = None, *,
                    image_policy: ImagePolicy | None = None) -> Iterator[OutputDelta]:
        """One conversation's answer as it is generated: `OutputDelta`s with text (`index`: of which
        choice), each choice's last one finished."""
        limit = min(self.engine.max_model_len, self.engine.kv_capacity)
        prompt = chat_prompt(self.processor, list(conversation), image_policy, limit)
        params = params or SamplingParams()
        rid = self.engine.add_request(prompt, params)
        self.outputs.add(rid, params)
        open_choices = params.n
        finished = False
        try:
            while not finished:
                deltas, finish = self.outputs.process(self.engine.step())
                for reason, ids in finish.items():
                    self.engine.finish_requests(ids, reason)
                for delta in deltas:
                    if delta.owner == rid:
                        open_choices -= delta.finished
                        finished = open_choices == 0
                        yield delta
        finally:
            if not finished:
                self.engine.abort(rid)
                self.outputs.abort(rid)

    # ------------------------------------------------------------------ running
    def _run(self, prompts: list[Prompt], params) -> list[RequestOutput]:
        if params is None:
            params = SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise RequestError(f"got {len(prompts)} prompts but {len(params)} sampling parameters")
        for prompt, p in zip(prompts, params):
            self.engine.check(prompt, p)  # fail before running anything
        results: dict[str, RequestOutput] = {}
        order = []
        try:
            for prompt, p in zip(prompts, params):
                rid = self.engine.add_request(prompt, p)
                self.outputs.add(rid, p)
                results[rid] = RequestOutput.start(rid, prompt.token_ids, p.logprobs is not None, p.n)
                order.append(rid)
            pending = sum(p.n for p in params)  # choices
            while pending:
                deltas, finish = self.outputs.process(self.engine.step())
                for reason, ids in finish.items():
                    self.engine.finish_requests(ids, reason)
                for delta in deltas:
                    results[delta.owner].add(delta)
                    pending -= delta.finished
        finally:
            for rid in order:
                if not results[rid].finished:
                    self.engine.abort(rid)
                    self.outputs.abort(rid)
        return [results[rid] for rid in order]
