"""Training data: chat and interleaved-document JSONL -> token ids with a loss mask.

Chat lines are `{"messages": [...]}` in the OpenAI format; the loss covers the assistant
answers (and the EOS that closes each one). Document lines are `{"content": [parts]}` with
text and image_url parts; the loss covers the text tokens. Image paths are relative to the
JSONL file. Bad lines are reported as `file:line: reason` and skipped (or, with
`on_error: fail`, stop the run); a summary counts what was skipped and why.
"""

from __future__ import annotations

import json
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
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise DataError(f"messages[{i}]: a message must be an object")
        if msg.get("role") != "assistant":
            if msg.get("role") == "user":
                images += _image_refs(msg.get("content"))
            continue
        if i == 0 or messages[i - 1].get("role") == "assistant":
            raise DataError(f"messages[{i}]: an assistant message must follow a user message")
        prompt, _ = processor.encode_chat(messages[:i], policy)
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
               on_error: str = "skip", log=print, max_messages: int = 20) -> tuple[list[Example], LoadReport]:
    """Read one JSONL file. `fmt`: 'chat', 'document' or 'auto' (by key, per line)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: training data file not found")
    if fmt not in ("auto", "chat", "document"):
        raise ConfigError(f"data format must be 'auto', 'chat' or 'document', got {fmt!r}")
    policy = replace(LOCAL_POLICY, base_dir=path.parent.resolve(), allow_remote=False)
    examples, report = [], LoadReport()
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise DataError("a line must be a JSON object")
                kind = fmt
                if kind == "auto":
                    kind = "chat" if "messages" in record else "document" if "content" in record else None
                    if kind is None:
                        raise DataError("expected a 'messages' (chat) or 'content' (document) key")
                if kind == "chat":
                    if "messages" not in record:
                        raise DataError("missing 'messages'")
                    ids, mask, images = encode_chat_example(processor, record["messages"], policy)
                else:
                    if "content" not in record:
                        raise DataError("missing 'content'")
                    ids, mask, images = encode_document_example(processor, record["content"], policy)
                if len(ids) > max_tokens:
                    report.skipped["too long"] += 1
                    msg = f"{where}: sample has {len(ids)} tokens, over the limit of {max_tokens} (data.seq_len)"
                    if on_error == "fail":
                        raise DataError(msg)
                    if len(report.messages) < max_messages:
                        report.messages.append(msg)
                        log(f"warning: {msg}; skipped")
                    continue
                if not any(mask):
                    raise DataError("no tokens to train on")
            except DataError as exc:
                if str(exc).startswith(where):
                    raise
                _bad(where, exc, report, on_error, log, max_messages)
                continue
            except (PixtralError, ValueError) as exc:
                _bad(where, exc, report, on_error, log, max_messages)
                continue
            examples.append(Example(ids, mask, images, policy, where))
            report.kept += 1
    return examples, report


def _bad(where, exc, report, on_error, log, max_messages):
    msg = f"{where}: {exc}"
    if on_error == "fail":
        raise DataError(msg) from None
    report.skipped[_reason(exc)] += 1
    if len(report.messages) < max_messages:
        report.messages.append(msg)
        log(f"warning: {msg}; skipped")


def load_files(paths: list[str], processor: Processor, max_tokens: int, fmt: str = "auto",
               on_error: str = "skip", log=print, name: str = "train") -> list[Example]:
    examples, total = [], LoadReport()
    for p in paths:
        ex, report = load_jsonl(p, processor, max_tokens, fmt, on_error, log)
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
