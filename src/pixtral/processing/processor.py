"""Chat messages (OpenAI format) -> token ids and image tensors, exactly as mistral-common does.

The tokenizer, prompt format and image preprocessing are mistral-common's own: this module
turns OpenAI-style messages into its request objects (loading images under an `ImagePolicy`)
and returns what `encode_chat_completion` produces as torch tensors.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch
from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, ToolMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import FunctionCall, Tool, ToolCall
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from PIL import Image

from pixtral.errors import ConfigError, ImageError, RequestError
from pixtral.processing.images import LOCAL_POLICY, ImagePolicy, decode_pixels, open_image


class Processor:
    def __init__(self, tokenizer: MistralTokenizer, image_policy: ImagePolicy = LOCAL_POLICY):
        self.tokenizer = tokenizer
        self.image_policy = image_policy
        self._text = tokenizer.instruct_tokenizer.tokenizer
        self._image_encoder = getattr(tokenizer.instruct_tokenizer, "image_encoder", None)
        if self._image_encoder is not None:
            self._image_encoder = tokenizer.instruct_tokenizer.image_encoder = EncodedAtLoad(self._image_encoder)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_file(cls, path: str | Path, image_policy: ImagePolicy = LOCAL_POLICY) -> "Processor":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: tokenizer file not found")
        try:
            tokenizer = MistralTokenizer.from_file(str(path))
        except (ValueError, KeyError, AssertionError, json.JSONDecodeError, MistralCommonException) as exc:
            raise ConfigError(f"{path}: not a valid mistral-common tokenizer ({exc})") from None
        return cls(tokenizer, image_policy)

    # ------------------------------------------------------------------ ids
    @property
    def bos_id(self) -> int:
        return self._text.bos_id

    @property
    def eos_id(self) -> int:
        return self._text.eos_id

    @property
    def vocab_size(self) -> int:
        return self._text.n_words

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """The most bytes one token stands for: a text of n bytes is at least n / this many tokens."""
        return max(len(self.token_bytes(i)) for i in range(self.vocab_size))

    @property
    def image_token_ids(self) -> dict[str, int] | None:
        if self._image_encoder is None:
            return None
        ids = self._image_encoder.special_ids
        return {"img": ids.img, "img_break": ids.img_break, "img_end": ids.img_end}

    # ------------------------------------------------------------------ encoding
    def encode_chat(self, messages: list[dict[str, Any]], policy: ImagePolicy | None = None,
                    tools: list[Tool] | None = None) -> tuple[list[int], list[torch.Tensor]]:
        """OpenAI-format messages -> (token ids ending with [/INST] or [/TOOL_RESULTS], image tensors
        [3, H, W]); `tools` go in the prompt as the tokenizer version defines."""
        return self.encode_converted(self.convert_messages(messages, policy), tools)

    def convert_messages(self, messages: list[dict[str, Any]], policy: ImagePolicy | None = None) -> list:
        """OpenAI-format messages -> mistral-common messages, images loaded. Encode a prefix of the
        result with `encode_converted` (training encodes every prefix that ends with a user turn,
        and loads each image once that way)."""
        policy = policy or self.image_policy
        if not isinstance(messages, list) or not messages:
            raise RequestError("'messages' must be a non-empty list")
        return [self._convert_message(i, m, policy) for i, m in enumerate(messages)]

    def encode_converted(self, converted: list, tools: list[Tool] | None = None
                         ) -> tuple[list[int], list[torch.Tensor]]:
        request = self._request(converted, tools)
        try:
            tokenized = self.tokenizer.encode_chat_completion(request)
        except (MistralCommonException, ValueError, AssertionError) as exc:
            raise RequestError(f"invalid conversation: {exc}") from None
        return tokenized.tokens, [torch.from_numpy(img) for img in tokenized.images]

    def to_request(self, messages: list[dict[str, Any]], policy: ImagePolicy | None = None) -> ChatCompletionRequest:
        return self._request(self.convert_messages(messages, policy))

    @staticmethod
    def _request(converted: list, tools: list[Tool] | None = None) -> ChatCompletionRequest:
        if not converted:
            raise RequestError("'messages' must be a non-empty list")
        if not isinstance(converted[-1], (UserMessage, ToolMessage)):
            raise RequestError("the last message must be from the user or a tool (the model answers it)")
        try:
            return ChatCompletionRequest(messages=converted, tools=tools or None)
        except (MistralCommonException, ValueError) as exc:
            raise RequestError(f"invalid conversation: {exc}") from None

    def _convert_message(self, index: int, message: Any, policy: ImagePolicy):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where}: a message must be an object with 'role' and 'content'")
        role = message.get("role")
        content = message.get("content")
        if role in ("system", "developer"):
            return SystemMessage(content=self._text_only(content, where))
        if role == "assistant":
            if message.get("tool_calls"):
                text = self._text_only(content, where) if content else None
                return AssistantMessage(content=text or None, tool_calls=_tool_calls(message["tool_calls"], where))
            return AssistantMessage(content=self._text_only(content, where))
        if role == "user":
            return UserMessage(content=self._user_content(content, where, policy))
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise RequestError(f"{where}.tool_call_id: a tool message needs the id of the call it answers")
            return ToolMessage(content=self._text_only(content, where), tool_call_id=mistral_call_id(call_id))
        raise RequestError(f"{where}: unknown role {role!r} (expected 'system', 'user', 'assistant' or 'tool')")

    @staticmethod
    def _text_only(content: Any, where: str) -> str:
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise RequestError(f"{where}.content[{j}]: only text parts are allowed in this message")
                texts.append(part["text"])
            return "\n\n".join(texts)  # mistral-common joins adjacent text chunks the same way
        raise RequestError(f"{where}: 'content' must be a string or a list of parts")

    def _user_content(self, content: Any, where: str, policy: ImagePolicy):
        if isinstance(content, str):
            if not content:
                raise RequestError(f"{where}: empty message")
            return content
        if not isinstance(content, list) or not content:
            raise RequestError(f"{where}: 'content' must be a non-empty string or list of parts")
        chunks = []
        for j, part in enumerate(content):
            here = f"{where}.content[{j}]"
            if not isinstance(part, dict):
                raise RequestError(f"{here}: a content part must be an object with a 'type'")
            kind = part.get("type")
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise RequestError(f"{here}: text part needs a string 'text'")
                chunks.append(TextChunk(text=part["text"]))
            elif kind in ("image_url", "image"):
                chunks.append(ImageChunk(image=self._load_part_image(part, here, policy)))
            else:
                raise RequestError(f"{here}: unsupported content part type {kind!r} (use 'text' or 'image_url')")
        if any(isinstance(c, ImageChunk) for c in chunks) and self._image_encoder is None:
            raise RequestError(f"{where}: this model's tokenizer has no image support")
        return chunks

    def _load_part_image(self, part: dict, here: str, policy: ImagePolicy) -> Image.Image:
        ref = part.get("image_url", part.get("image"))
        if isinstance(ref, dict):
            ref = ref.get("url")
        if ref is None:
            raise RequestError(f"{here}: image part needs 'image_url': {{'url': ...}}")
        try:
            image, name = open_image(ref, policy)
            with policy.budget.reserve(image.size):
                decode_pixels(image, name)
                return self._image_encoder.encode_now(image) if self._image_encoder is not None else image
        except ImageError as exc:
            raise type(exc)(f"{here}: {exc}") from None  # keep the subtype (e.g. too large)

    def encode_document(self, parts: list[dict[str, Any]], policy: ImagePolicy | None = None
                        ) -> tuple[list[int], list[torch.Tensor], list[bool]]:
        """An interleaved document (pre-training / base-model prompt): BOS, then text and image blocks.

        Returns ids, images and a mask that is True on text tokens (what a loss may train on).
        """
        policy = policy or self.image_policy
        ids, images, is_text = [self.bos_id], [], [False]
        for j, part in enumerate(parts):
            here = f"content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                toks = self._text.encode(part.get("text", ""), bos=False, eos=False)
                ids += toks
                is_text += [True] * len(toks)
            elif kind in ("image_url", "image"):
                if self._image_encoder is None:
                    raise RequestError(f"{here}: this tokenizer has no image support")
                enc = self._image_encoder(ImageChunk(image=self._load_part_image(part, here, policy)))
                ids += enc.tokens
                is_text += [False] * len(enc.tokens)
                images.append(torch.from_numpy(enc.image))
            else:
                raise RequestError(f"{here}: unsupported content part type {kind!r}")
        return ids, images, is_text

    def encode_text(self, text: str) -> list[int]:
        return self._text.encode(text, bos=False, eos=False)

    # ------------------------------------------------------------------ decoding
    def decode(self, ids: list[int]) -> str:
        return self._text.decode(list(ids), special_token_policy=SpecialTokenPolicy.IGNORE)

    def token_bytes(self, token_id: int) -> bytes:
        return self._text.id_to_byte_piece(token_id, special_token_policy=SpecialTokenPolicy.IGNORE)

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)


_CALL_ID = re.compile(r"^[a-zA-Z0-9]{9}$")


def mistral_call_id(call_id: str) -> str:
    """A tool call id as Mistral's tokenizers require (9 letters or digits): ours pass as they are, others
    (another provider's "call_...") map to a stable one, the same in the call and in the tool's answer."""
    if _CALL_ID.match(call_id):
        return call_id
    digest = int.from_bytes(hashlib.sha256(call_id.encode()).digest()[:8], "big")
    alphabet = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    return "".join(alphabet[(digest >> (6 * i)) % 62] for i in range(9))


def _tool_calls(calls: Any, where: str) -> list[ToolCall]:
    """An assistant message's OpenAI `tool_calls` -> mistral-common's (arguments: a JSON object, as text)."""
    if not isinstance(calls, list):
        raise RequestError(f"{where}.tool_calls must be a list")
    out = []
    for j, call in enumerate(calls):
        here = f"{where}.tool_calls[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RequestError(f"{here}: a tool call needs 'function': {{'name': ..., 'arguments': ...}}")
        arguments = function.get("arguments", "{}")
        try:
            parsed = json.loads(arguments) if isinstance(arguments, str) else None
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise RequestError(f"{here}.function.arguments must be a JSON object, as a string")
        call_id = call.get("id")
        if not isinstance(call_id, str) or not call_id:
            raise RequestError(f"{here}.id: a tool call needs an id")
        out.append(ToolCall(id=mistral_call_id(call_id), function=FunctionCall(name=function["name"],
                                                                                 arguments=arguments)))
    return out


class StreamDecoder:
    """Turns tokens into text as they arrive; bytes of an unfinished UTF-8 character wait for the next token."""

    def __init__(self, processor: Processor):
        self._processor = processor
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._processor.token_bytes(token_id))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class EncodedAtLoad:
    """mistral-common's image encoder, run when an image is loaded rather than when the prompt is built.

    `encode_now` preprocesses a decoded image at once, while it holds the decode budget, and
    returns a 1x1 stand-in that carries the result; the full-size pixels are freed before the
    next image of the request is decoded, so a request never holds more than the processor's
    output. When mistral-common later builds the prompt it calls this encoder with the stand-in,
    and gets the stored encoding back. Every prefix of a conversation (training encodes each)
    holds the same stand-in, so each image is preprocessed once. Any other image goes to the
    wrapped encoder as usual.
    """

    KEY = "pixtral.image_encoding"

    def __init__(self, encoder):
        self._encoder = encoder

    def __getattr__(self, name: str):  # special_ids, image_config, ... of the wrapped encoder
        if name.startswith("__") or name == "_encoder":
            raise AttributeError(name)
        return getattr(self._encoder, name)

    def encode_now(self, image: Image.Image) -> Image.Image:
        stand_in = Image.new("RGB", (1, 1))
        stand_in.info[self.KEY] = self._encoder(ImageChunk(image=image))
        return stand_in

    def __call__(self, chunk):
        image = getattr(chunk, "image", None)
        encoding = image.info.get(self.KEY) if isinstance(image, Image.Image) else None
        return encoding if encoding is not None else self._encoder(chunk)
