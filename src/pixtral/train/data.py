"""Training data: chat and interleaved-document JSONL -> token ids with a loss mask.

Chat lines are `{"messages": [...]}` in the OpenAI format; the loss covers the assistant
answers (and the EOS that closes each one). Document lines are `{"content": [parts]}` with
text and image_url parts; the loss covers the text tokens. Image paths are relative to the
JSONL file. Bad lines are reported as `file:line: reason` and skipped (or, with
`on_error: fail`, stop the run); a summary counts what was skipped and why.
"""

from __future__ import annotations

import json
import multiprocessing
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from pixtral.errors import ConfigError, ImageError, PixtralError
from pixtral.processing.images import LOCAL_POLICY, ImagePolicy
from pixtral.processing.processor import Processor


class DataError(PixtralError, ValueError):
    """A training data file or line is invalid."""


@dataclass
class Example:
    ids: list[int]
    mask: list[bool]  # mask[i]: ids[i] is a training target (predicted from ids[:i])
    images: list[str]  # image references, resolved under `policy`
    policy: ImagePolicy
    where: str  # "file:line"

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_targets(self) -> int:
        return sum(self.mask)


@dataclass
class LoadReport:
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    messages: list[str] = field(default_factory=list)  # first few "file:line: reason"

    def summary(self, name: str) -> str:
        total = self.kept + sum(self.skipped.values())
        if not self.skipped:
            return f"{name}: {self.kept} samples"
        why = ", ".join(f"{n} {reason}" for reason, n in self.skipped.most_common())
        return f"{name}: {self.kept} of {total} samples kept; skipped {why}"


def _image_refs(content) -> list[str]:
    refs = []
    for part in content if isinstance(content, list) else []:
        if isinstance(part, dict) and part.get("type") in ("image_url", "image"):
            ref = part.get("image_url", part.get("image"))
            refs.append(ref.get("url") if isinstance(ref, dict) else ref)
    return refs


def encode_chat_example(processor: Processor, messages: list, policy: ImagePolicy) -> tuple[list[int], list[bool], list[str]]:
    """Ids and loss mask of a whole conversation (which must end with an assistant turn).

    mistral-common encodes the prompt up to each user turn; the answer that follows is its
    text tokens plus EOS. We check that each prompt prefix extends the previous sequence,
    so the ids are exactly what mistral-common would produce for the conversation.
    """
    if not isinstance(messages, list) or not messages:
        raise DataError("'messages' must be a non-empty list")
    if not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
        raise DataError("the last message must be an assistant answer (nothing to train on otherwise)")
    ids: list[int] = []
    mask: list[bool] = []
    images: list[str] = []
    converted = None  # the conversation in mistral-common's messages, each image loaded once
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise DataError(f"messages[{i}]: a message must be an object")
        if msg.get("role") != "assistant":
            if msg.get("role") == "user":
                images += _image_refs(msg.get("content"))
            continue
        if i == 0 or messages[i - 1].get("role") == "assistant":
            raise DataError(f"messages[{i}]: an assistant message must follow a user message")
        if converted is None:
            converted = processor.convert_messages(messages, policy)
        prompt, _ = processor.encode_converted(converted[:i])
        if prompt[: len(ids)] != ids:
            raise DataError(f"messages[{i}]: the prompt does not extend the previous turns (tokenizer mismatch)")
        mask += [False] * (len(prompt) - len(ids))
        ids = list(prompt)
        content = Processor._text_only(msg.get("content"), f"messages[{i}]")
        answer = processor.encode_text(content.rstrip(" ")) + [processor.eos_id]
        ids += answer
        mask += [True] * len(answer)
    return ids, mask, images


def encode_document_example(processor: Processor, content: list, policy: ImagePolicy):
    if not isinstance(content, list) or not content:
        raise DataError("'content' must be a non-empty list of text and image_url parts")
    ids, _, is_text = processor.encode_document(content, policy)
    ids, is_text = ids + [processor.eos_id], is_text + [True]
    return ids, is_text, _image_refs(content)


def _reason(exc: Exception) -> str:
    if isinstance(exc, ImageError):
        return "bad or missing images"
    if isinstance(exc, json.JSONDecodeError):
        return "invalid JSON"
    return "invalid samples"


def load_jsonl(path: str | Path, processor: Processor, max_tokens: int, fmt: str = "auto",
               on_error: str = "skip", log=print, max_messages: int = 20, workers: int = 1
               ) -> tuple[list[Example], LoadReport]:
    """Read one JSONL file. `fmt`: 'chat', 'document' or 'auto' (by key, per line).

    With `workers` > 1 the lines are encoded in that many forked processes, in contiguous chunks
    (the result and the report are the same as with one). Encoding is the slow part: mistral-common
    loads and resizes every image to count its tokens.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: training data file not found")
    if fmt not in ("auto", "chat", "document"):
        raise ConfigError(f"data format must be 'auto', 'chat' or 'document', got {fmt!r}")
    policy = replace(LOCAL_POLICY, base_dir=path.parent.resolve(), allow_remote=False)
    with path.open(encoding="utf-8") as f:
        lines = list(f)
    job = _Job(path, processor, max_tokens, fmt, on_error, policy, max_messages)
    workers = max(1, min(workers, len(lines) // MIN_LINES_PER_WORKER))
    if workers == 1 or "fork" not in multiprocessing.get_all_start_methods():
        parts = [job.encode(0, lines)]
    else:
        size = -(-len(lines) // workers)
        chunks = [(a, lines[a:a + size]) for a in range(0, len(lines), size)]
        global _JOB
        _JOB = job  # inherited by the forked workers: the processor is not pickled
        try:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                parts = pool.starmap(_encode_chunk, chunks)
        finally:
            _JOB = None
    examples, report = [], LoadReport()
    for part_examples, part in parts:
        examples += part_examples
        report.kept += part.kept
        report.skipped.update(part.skipped)
        for msg in part.messages[: max_messages - len(report.messages)]:
            report.messages.append(msg)
            log(f"warning: {msg}; skipped")
    return examples, report


MIN_LINES_PER_WORKER = 2000  # below this, starting processes costs more than it saves
_JOB = None


def _encode_chunk(first: int, lines: list[str]):
    return _JOB.encode(first, lines)


@dataclass
class _Job:
    """Encodes lines of one JSONL file: what `load_jsonl` hands to each worker."""
    path: Path
    processor: Processor
    max_tokens: int
    fmt: str
    on_error: str
    policy: ImagePolicy
    max_messages: int

    def encode(self, first: int, lines: list[str]) -> tuple[list[Example], LoadReport]:
        """Lines `first + 1`, `first + 2`, ... of the file (numbered from 1)."""
        examples, report = [], LoadReport()
        for lineno, line in enumerate(lines, first + 1):
            if not line.strip():
                continue
            where = f"{self.path}:{lineno}"
            try:
                examples.append(self._example(line, where, report))
                report.kept += 1
            except _Skipped:
                continue
            except DataError as exc:
                if str(exc).startswith(where):
                    raise
                self._bad(where, exc, report)
            except (PixtralError, ValueError) as exc:
                self._bad(where, exc, report)
        return examples, report

    def _example(self, line: str, where: str, report: LoadReport) -> Example:
        record = json.loads(line)
        if not isinstance(record, dict):
            raise DataError("a line must be a JSON object")
        kind = self.fmt
        if kind == "auto":
            kind = "chat" if "messages" in record else "document" if "content" in record else None
            if kind is None:
                raise DataError("expected a 'messages' (chat) or 'content' (document) key")
        if kind == "chat":
            if "messages" not in record:
                raise DataError("missing 'messages'")
            ids, mask, images = encode_chat_example(self.processor, record["messages"], self.policy)
        else:
            if "content" not in record:
                raise DataError("missing 'content'")
            ids, mask, images = encode_document_example(self.processor, record["content"], self.policy)
        if len(ids) > self.max_tokens:
            report.skipped["too long"] += 1
            msg = f"{where}: sample has {len(ids)} tokens, over the limit of {self.max_tokens} (data.seq_len)"
            if self.on_error == "fail":
                raise DataError(msg)
            if len(report.messages) < self.max_messages:
                report.messages.append(msg)
            raise _Skipped
        if not any(mask):
            raise DataError("no tokens to train on")
        return Example(ids, mask, images, self.policy, where)

    def _bad(self, where: str, exc: Exception, report: LoadReport) -> None:
        msg = f"{where}: {exc}"
        if self.on_error == "fail":
            raise DataError(msg) from None
        report.skipped[_reason(exc)] += 1
        if len(report.messages) < self.max_messages:
            report.messages.append(msg)


class _Skipped(Exception):
    """A line left out on purpose (already counted in the report)."""


def load_files(paths: list[str], processor: Processor, max_tokens: int, fmt: str = "auto",
               on_error: str = "skip", log=print, name: str = "train", workers: int = 1) -> list[Example]:
    examples, total = [], LoadReport()
    for p in paths:
        ex, report = load_jsonl(p, processor, max_tokens, fmt, on_error, log, workers=workers)
        examples += ex
        total.kept += report.kept
        total.skipped.update(report.skipped)
    log(total.summary(name))
    if not examples:
        raise DataError(f"no usable {name} samples in {', '.join(map(str, paths))}")
    return examples


def load_images(processor: Processor, example: Example) -> list[torch.Tensor]:
    """The image tensors of one example (loaded when its batch is built, not kept in memory)."""
    if not example.images:
        return []
    parts = [{"type": "image_url", "image_url": {"url": ref}} for ref in example.images]
    return processor.encode_document(parts, example.policy)[1]
