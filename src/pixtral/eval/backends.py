"""The model under test (and the judge): an OpenAI-compatible endpoint, or our engine in-process.

Both expose `complete(messages, max_tokens=..., temperature=..., seed=...) -> str`, thread-safe, where
the messages are OpenAI chat messages whose image parts hold `EncodedImage`s (see `data.Item`), and
`complete_logprobs(...) -> (text, top)`: the answer with the first generated token's most likely
tokens `[(token text, logprob), ...]`, or None where the endpoint gives no logprobs (MMLU's letter
comparison).

Endpoint calls go through the official `openai` client with images as base64 `data:` URIs. The
client retries what it deems transient (connection errors and timeouts; 408, 409, 429 and 5xx answers)
a bounded number of times, with its exponential backoff (0.5 s doubling to at most 8 s, jittered, or
the server's Retry-After); other HTTP errors fail the item at once. When retries run out on a
connection error and the endpoint no longer answers at all, `EndpointUnreachableError` stops the run
(finished items stay saved).
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from pixtral.errors import PixtralError
from pixtral.eval.data import to_openai_messages
from pixtral.eval.errors import BackendError, EndpointUnreachableError

OPENAI_BASE_URL = "https://api.openai.com/v1"


TopLogprobs = list[tuple[str, float]]  # (token text, logprob), most likely first


class RequestFailed(Exception):
    """One request failed for good (after its retries); the item is recorded as failed.

    `partial` holds what a multi-request item finished before this failure (MT-Bench turns,
    samples), so a resumed run asks only for the rest."""

    def __init__(self, message: str, partial: Any = None):
        super().__init__(message)
        self.partial = partial


class Backend(Protocol):
    identity: dict[str, Any]  # what the answers depend on (used to decide whether results can be resumed)

    def check(self) -> list[str]: ...  # raise if unusable; return warnings

    def complete(self, messages: list[dict[str, Any]], *, max_tokens: int, temperature: float,
                 seed: int | None = None) -> str: ...

    def complete_logprobs(self, messages: list[dict[str, Any]], *, max_tokens: int, temperature: float,
                          top_logprobs: int) -> tuple[str, TopLogprobs | None]: ...

    def describe(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


def normalize_endpoint(url: str, option: str = "--endpoint") -> str:
    """The client base URL: `http://host:8000` and `.../v1/chat/completions` both become `.../v1`."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise BackendError(f"{option} must be an http(s) URL such as http://localhost:8000/v1, got '{url}'")
    path = parts.path.rstrip("/")
    for suffix in ("/chat/completions", "/completions"):
        if path.endswith(suffix):
            path = path[: -len(suffix)]
    if not path:
        path = "/v1"
    return f"{parts.scheme}://{parts.netloc}{path}"


class OpenAIBackend:
    """Any OpenAI-compatible chat-completions API (our server, vLLM, OpenAI, ...).

    `attempts` bounds the tries per request (the client's `max_retries` is one less); the client's
    own backoff sets the waits.
    """

    def __init__(self, endpoint: str, model: str, *, api_key: str | None = None, timeout: float = 600.0,
                 attempts: int = 3, role: str = "model",
                 option: str = "--endpoint"):
        import openai

        if attempts < 1:
            raise BackendError(f"retries: need at least 1 attempt per request, got {attempts}")
        self.base_url = normalize_endpoint(endpoint, option)
        self.model = model
        self.role = role
        self.attempts = attempts
        self.timeout = timeout
        self._openai = openai
        self.client = openai.OpenAI(base_url=self.base_url, api_key=api_key or "EMPTY", timeout=timeout,
                                    max_retries=attempts - 1)
        self._probe = self.client.with_options(timeout=10.0, max_retries=0)  # one quick try: is anybody there?
        self.identity = {"served_model": model}
        self._logprobs: bool | None = None  # whether the endpoint returns logprobs (None: not asked yet)

    def describe(self) -> dict[str, Any]:
        described = {"kind": "endpoint", "endpoint": self.base_url, "served_model": self.model,
                     "timeout_s": self.timeout, "attempts": self.attempts}
        if self._logprobs is not None:
            described["logprobs"] = self._logprobs
        return described

    def _unreachable(self, exc: Exception) -> EndpointUnreachableError:
        cause = getattr(exc, "__cause__", None) or exc
        return EndpointUnreachableError(
            f"cannot reach the {self.role} endpoint {self.base_url} ({type(cause).__name__}: {cause}); "
            "is the server running and the URL right?")

    def reachable(self, tries: int = 3) -> bool:
        """Whether anything answers at the endpoint: False only when every probe fails to connect
        (refused, unknown host, connect timeout); any HTTP answer, even an error, counts as reachable."""
        for attempt in range(tries):
            try:
                self._probe.models.list()
                return True
            except self._openai.APIConnectionError as exc:  # includes timeouts
                if type(exc.__cause__).__name__ not in ("ConnectError", "ConnectTimeout"):
                    return True  # it answered, then misbehaved (reset, protocol error, slow reply)
            except self._openai.APIError:
                return True
            if attempt + 1 < tries:
                time.sleep(0.2)
        return False

    def check(self) -> list[str]:
        openai = self._openai
        try:
            listed = [m.id for m in self._probe.models.list().data]
        except openai.APIConnectionError as exc:
            if not self.reachable():
                raise self._unreachable(exc) from exc
            return []
        except openai.AuthenticationError as exc:
            raise BackendError(f"the {self.role} endpoint {self.base_url} rejected the API key (HTTP 401)") from exc
        except openai.APIError:
            return []  # some servers have no /models; chat requests will tell
        if listed and self.model not in listed:
            return [f"{self.role} endpoint {self.base_url} does not list model '{self.model}' (it lists: {', '.join(listed[:10])})"]
        return []

    def complete(self, messages: list[dict[str, Any]], *, max_tokens: int, temperature: float,
                 seed: int | None = None) -> str:
        extra = {"seed": seed} if seed is not None else {}
        return self._create(messages, max_tokens, temperature, **extra).choices[0].message.content or ""

    def complete_logprobs(self, messages: list[dict[str, Any]], *, max_tokens: int, temperature: float,
                          top_logprobs: int) -> tuple[str, TopLogprobs | None]:
        if self._logprobs is not False:
            try:
                response = self._create(messages, max_tokens, temperature, logprobs=True, top_logprobs=top_logprobs)
            except RequestFailed as exc:
                # An endpoint without logprobs refuses the option by name (OpenAI's wording and ours);
                # other refusals are the item's own.
                if self._logprobs is True or "logprob" not in str(exc).lower():
                    raise
                self._logprobs = False
            else:
                self._logprobs = True
                choice = response.choices[0]
                return choice.message.content or "", _first_top_logprobs(choice)
        return self.complete(messages, max_tokens=max_tokens, temperature=temperature), None

    def _create(self, messages: list[dict[str, Any]], max_tokens: int, temperature: float, **options: Any):
        openai = self._openai
        try:  # the client retries transient failures itself
            response = self.client.chat.completions.create(
                model=self.model, messages=to_openai_messages(messages), max_tokens=max_tokens,
                temperature=temperature, **options)
        except openai.APIConnectionError as exc:  # timeouts too
            if not self.reachable():
                raise self._unreachable(exc) from exc
            raise RequestFailed(f"{_brief(exc)} ({self.attempts} attempts)") from exc
        except (openai.RateLimitError, openai.InternalServerError) as exc:
            raise RequestFailed(f"{_brief(exc)} ({self.attempts} attempts)") from exc
        except openai.APIStatusError as exc:
            raise RequestFailed(f"HTTP {exc.status_code} from {self.base_url}: {_brief(exc)}") from exc
        except openai.APIError as exc:
            raise RequestFailed(f"bad response from {self.base_url}: {_brief(exc)}") from exc
        if not response.choices:
            raise RequestFailed(f"response from {self.base_url} has no choices")
        return response

    def close(self) -> None:
        self.client.close()


def _first_top_logprobs(choice: Any) -> TopLogprobs | None:
    """The first answer token's top logprobs; None when the response has none or they are malformed."""
    try:
        content = choice.logprobs.content if choice.logprobs is not None else None
        if content is None:
            return None
        if not content:  # nothing generated
            return []
        return [(str(t.token), float(t.logprob)) for t in content[0].top_logprobs or []]
    except (AttributeError, TypeError, ValueError):
        return None


def _brief(exc: Exception) -> str:
    status = getattr(exc, "status_code", None)
    text = str(exc).replace("\n", " ")
    if len(text) > 300:
        text = text[:300] + "..."
    name = type(exc).__name__
    return f"{name} (HTTP {status}): {text}" if status else f"{name}: {text}"


# ------------------------------------------------------------------------------ local engine


def _import_engine():
    try:
        from pixtral import LLM, SamplingParams  # provided by the engine
    except ImportError as exc:
        raise BackendError(
            "the in-process engine is not available (cannot import LLM and SamplingParams from pixtral: "
            f"{exc}); evaluate an endpoint instead with --endpoint URL --served-model NAME") from exc
    return LLM, SamplingParams


class LocalBackend:
    """Our engine in-process: `LLM(path).chat(conversations, SamplingParams(...))`.

    Requests from the runner's worker threads are gathered into batches of up to `max_batch`
    conversations (waiting at most `gather_s` for a batch to fill), and one thread drives the engine.
    A failing batch is retried one conversation at a time so one bad item cannot fail its neighbours.
    """

    def __init__(self, model_path: str | None, *, max_batch: int = 8, gather_s: float = 0.05,
                 tensor_parallel_size: int = 1, quantization: str | None = None):
        llm_cls, self._sampling_cls = _import_engine()
        self.model_path = model_path
        self.tensor_parallel_size = tensor_parallel_size
        options = {"tensor_parallel_size": tensor_parallel_size} if tensor_parallel_size != 1 else {}
        if quantization is not None:
            options["quantization"] = quantization
        try:
            self.llm = llm_cls(model_path, **options)
        except PixtralError:
            raise
        except Exception as exc:
            raise BackendError(f"cannot load model {model_path or '(default)'}: {type(exc).__name__}: {exc}") from exc
        self.max_batch = max(1, max_batch)
        self.gather_s = gather_s
        self.identity = {"model": model_path or "default"}
        if getattr(self.llm.model, "quantization", None) is not None:  # quantized answers are not the float model's
            self.identity["quantization"] = self.llm.model.quantization
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="pixtral-eval-engine", daemon=True)
        self._thread.start()

    def describe(self) -> dict[str, Any]:
        described = {"kind": "local", "model": self.model_path or "default", "max_batch": self.max_batch}
        if self.tensor_parallel_size != 1:
            described["tensor_parallel_size"] = self.tensor_parallel_size
        quantization = getattr(self.llm.model, "quantization", None)
        if quantization is not None:  # asked for, or stored in the checkpoint
            described["quantization"] = quantization
        return described

    def check(self) -> list[str]:
        return []

    def complete(self, messages: list[dict[str, Any]], *, max_tokens: int, temperature: float,
                 seed: int | None = None) -> str:
        return self._submit(_Request(to_openai_messages(messages), max_tokens, temperature, seed))[0]

    def complete_logprobs(self, messages: list[dict[str, Any]], *, max_tokens: int, temperature: float,
                          top_logprobs: int) -> tuple[str, TopLogprobs | None]:
        return self._submit(_Request(to_openai_messages(messages), max_tokens, temperature, None, top_logprobs))

    def _submit(self, request: _Request) -> tuple[str, TopLogprobs | None]:
        self._queue.put(request)
        return request.future.result()

    def close(self) -> None:
        self._queue.put(None)
        # Let the engine thread finish before the interpreter exits: a thread still inside
        # torch at shutdown aborts the process.
        self._thread.join(timeout=60)
        close = getattr(self.llm, "close", None)
        if close is not None:  # tensor-parallel workers stop here
            close()

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self.gather_s
            stop = False
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            self._run(batch)
            if stop:
                return

    def _run(self, requests: list[_Request]) -> None:
        params = [self._sampling_cls(temperature=r.temperature, max_tokens=r.max_tokens, seed=r.seed,
                                     logprobs=r.top_logprobs) for r in requests]
        try:
            outputs = self.llm.chat([r.messages for r in requests], params)
            if len(outputs) != len(requests):
                raise RuntimeError(f"engine returned {len(outputs)} outputs for {len(requests)} conversations")
        except Exception as exc:  # isolate the failing conversation
            if len(requests) > 1:
                for request in requests:
                    self._run([request])
                return
            requests[0].future.set_exception(RequestFailed(f"engine error: {type(exc).__name__}: {exc}"))
            return
        for request, out in zip(requests, outputs):
            if out.error:  # the engine failed this conversation alone; the others of the batch stand
                request.future.set_exception(RequestFailed(f"engine error: {out.error}"))
                continue
            choice = out.outputs[0]
            top = None
            if request.top_logprobs is not None:
                first = choice.logprobs[0].top if choice.logprobs else []
                top = [(self._token_text(t), lp) for t, lp in first]
            request.future.set_result((choice.text, top))

    def _token_text(self, token_id: int) -> str:
        return self.llm.processor.token_bytes(token_id).decode("utf-8", errors="replace")


@dataclass
class _Request:
    messages: list[dict[str, Any]]
    max_tokens: int
    temperature: float
    seed: int | None = None
    top_logprobs: int | None = None
    future: Future = field(default_factory=Future)
