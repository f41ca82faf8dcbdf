"""The serving engine: continuous batching over a paged KV cache, kept apart from the model.

    LLM            batched offline inference (llm.chat / llm.generate)
    AsyncEngine    the engine in a background thread with asyncio streams (the server uses it)
    Engine         the synchronous core: add_request / step / abort / finish_requests

Inside the engine: scheduler -> KV-cache manager -> block allocator, then the model runner and
the sampler; text is made apart from the step loop, by the output processor (see `engine.py`).
"""

from pixtral.engine.async_engine import AsyncEngine, EngineDeadError, QueueFullError, RequestStream
from pixtral.engine.config import EngineConfig
from pixtral.engine.engine import Engine, EngineStats
from pixtral.engine.llm import LLM
from pixtral.engine.outputs import CompletionOutput, OutputDelta, RequestOutput, TokenLogprob
from pixtral.engine.request import Prompt

__all__ = ["LLM", "AsyncEngine", "Engine", "EngineConfig", "EngineStats", "RequestStream", "QueueFullError",
           "EngineDeadError", "RequestOutput", "CompletionOutput", "OutputDelta", "TokenLogprob", "Prompt"]
