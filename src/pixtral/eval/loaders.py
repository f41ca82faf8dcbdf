"""One loader per task: read the local dataset, build each item's request and reference.

Field names, splits and message layouts follow docs/evaluation.md (the task table and each task's section):
the image comes first, then `<question>\\n<Explicit prompt>`; MMMU interleaves its images where the
`<image N>` placeholders are; MM-MT-Bench and `synth` query every user turn with the reference
answers as history (teacher forcing).
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any, Callable

from pixtral.errors import ImageError
from pixtral.eval import prompts
from pixtral.eval.data import (
    Dataset,
    Item,
    Row,
    count_rows,
    hash_files,
    iter_rows,
    resolve_table_files,
    text_of,
)
from pixtral.eval.errors import DataError
from pixtral.eval.images import EncodedImage, decode_data_uri


def _image_part(image: EncodedImage) -> dict[str, Any]:
    return {"type": "image", "image": image}


def _user(content: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": content}]


def _single_image_item(item_id: str, image: EncodedImage, question: str, prompt: str, reference: Any,
                       meta: dict[str, Any]) -> Item:
    content = [_image_part(image), {"type": "text", "text": f"{question}\n{prompt}"}]
    return Item(item_id, _user(content), reference, {"question": question, **meta})


def _table_dataset(task: str, path: str | Path, split: str, columns: list[str], limit: int | None,
                   build: Callable[[Row], Item], config: str | None = None) -> Dataset:
    files = resolve_table_files(path, split, config)
    records = count_rows(files)
    if limit is not None:
        records = min(records, limit)
    root = Path(path).expanduser()
    return Dataset(
        task=task,
        files=files,
        sha256=hash_files(files, root if root.is_dir() else root.parent),
        total=records,
        records=records,
        stream=lambda: (build(row) for row in iter_rows(files, columns, limit)),
    )


def _row_id(row: Row, column: str) -> str:
    value = row.get(column)
    return str(value) if value not in (None, "") else str(row.index)


# ----------------------------------------------------------------------------------- ChartQA


def load_chartqa(path: str | Path, limit: int | None = None) -> Dataset:
    """`lmms-lab/ChartQA`, split `test`: `question`, `answer` (a string), `image`, `type`."""

    def build(row: Row) -> Item:
        meta = {"category": row.get("type")} if row.get("type") else {}
        return _single_image_item(str(row.index), row.image("image"), row.required("question"),
                                  prompts.CHARTQA_PROMPT, [str(row.required("answer"))], meta)

    return _table_dataset("chartqa", path, "test", ["question", "answer", "image", "type?"], limit, build)


# -------------------------------------------------------------------------------- MathVista


def load_mathvista(path: str | Path, limit: int | None = None) -> Dataset:
    """`AI4Math/MathVista`, split `testmini`: `query`, `decoded_image`, `choices`, `answer`.

    Multiple-choice golds become the option's letter (A = first choice).
    """

    def build(row: Row) -> Item:
        answer = str(row.required("answer"))
        choices = row.get("choices") or []
        meta: dict[str, Any] = {"question_type": row.get("question_type")}
        reference = answer
        if choices and row.get("question_type", "multi_choice") == "multi_choice":
            if answer in choices:
                reference = chr(ord("A") + choices.index(answer))
            else:
                meta["note"] = "answer not among choices; scored against the raw answer"
        if row.get("decoded_image") is not None:
            image = row.image("decoded_image")
        else:
            image = _image_from_path(row, "image")
        return _single_image_item(_row_id(row, "pid"), image, row.required("query"), prompts.MATHVISTA_PROMPT,
                                  [reference], meta)

    return _table_dataset("mathvista", path, "testmini",
                          ["pid?", "query", "decoded_image?", "image?", "choices?", "answer", "question_type?"],
                          limit, build)


def _image_from_path(row: Row, column: str) -> EncodedImage:
    rel = row.required(column)
    if isinstance(rel, dict):
        return row.image(column)
    for base in (row.base_dir, row.base_dir.parent):
        if (base / rel).is_file():
            return EncodedImage.from_file(base / rel, row.where(column))
    raise ImageError(f"{row.where(column)}: image file {rel} not found next to {row.path}")


# ------------------------------------------------------------------------------------- MMMU

_PLACEHOLDER = re.compile(r"(<image \d+>)")


def load_mmmu(path: str | Path, limit: int | None = None) -> Dataset:
    """`lmms-lab/MMMU`, split `validation`: `question`, `options`, `question_type`, `answer`, `image_1..7`."""
    columns = ["id?", "question", "options", "question_type", "answer"] + [f"image_{i}?" for i in range(1, 8)]
    return _table_dataset("mmmu", path, "validation", columns, limit, _mmmu_item)


def _mmmu_item(row: Row) -> Item:
    question = row.required("question")
    if row.required("question_type") == "multiple-choice":
        options = _literal(row, "options", list)
        lines = "\n".join(f"{chr(ord('A') + i)}. {opt}" for i, opt in enumerate(options))
        question = f"{question}\n{lines}"
    content: list[dict[str, Any]] = []
    for chunk in _PLACEHOLDER.split(question):
        if not chunk.strip():
            continue
        placeholder = re.fullmatch(r"<image (\d+)>", chunk)
        if placeholder:
            content.append(_image_part(row.image(f"image_{placeholder.group(1)}")))
        else:
            content.append({"type": "text", "text": chunk})
    if content and content[-1]["type"] == "text":
        content[-1]["text"] += "\n" + prompts.MMMU_PROMPT
    else:
        content.append({"type": "text", "text": prompts.MMMU_PROMPT})
    answer = str(row.required("answer"))
    reference = [str(a) for a in _literal(row, "answer", list)] if "[" in answer else [answer]
    item_id = _row_id(row, "id")
    meta = {"question": question, "question_type": row.get("question_type")}
    subject = re.fullmatch(r"[a-z]+_(.+)_\d+", item_id)
    if subject:
        meta["category"] = subject.group(1)
    return Item(item_id, _user(content), reference, meta)


def _literal(row: Row, column: str, kind: type) -> Any:
    try:
        value = ast.literal_eval(row.required(column))
    except (ValueError, SyntaxError) as exc:
        raise DataError(f"{row.where(column)}: not a Python literal list ({exc})") from exc
    if not isinstance(value, kind):
        raise DataError(f"{row.where(column)}: expected a {kind.__name__}, got {type(value).__name__}")
    return value


# ------------------------------------------------------------------------------------ DocVQA


def load_docvqa(path: str | Path, limit: int | None = None) -> Dataset:
    """`lmms-lab/DocVQA`, config `DocVQA`, split `validation`: `question`, `answers` (list), `image`."""

    def build(row: Row) -> Item:
        answers = [str(a) for a in row.required("answers")]
        return _single_image_item(_row_id(row, "questionId"), row.image("image"), row.required("question"),
                                  prompts.DOCVQA_PROMPT, answers, {})

    return _table_dataset("docvqa", path, "validation", ["questionId?", "question", "answers", "image"], limit,
                          build, config="DocVQA")


# ------------------------------------------------------------------------------------- VQAv2


def load_vqav2(path: str | Path, limit: int | None = None) -> Dataset:
    """`HuggingFaceM4/VQAv2` (or `lmms-lab/VQAv2`, same schema), split `validation`.

    `answers` is a list of `{answer, answer_confidence, answer_id}`; the golds are the `answer` strings.
    """

    def build(row: Row) -> Item:
        answers = [a["answer"] if isinstance(a, dict) else a for a in row.required("answers")]
        meta = {k: row.get(k) for k in ("question_type", "answer_type") if row.get(k) is not None}
        return _single_image_item(_row_id(row, "question_id"), row.image("image"), row.required("question"),
                                  prompts.VQAV2_PROMPT, [str(a) for a in answers], meta)

    return _table_dataset("vqav2", path, "validation",
                          ["question_id?", "question", "answers", "image", "question_type?", "answer_type?"],
                          limit, build)


# ------------------------------------------------------------------ multi-turn (teacher forcing)


def _turn_items(messages: list[dict[str, Any]], id_prefix: str, meta: dict[str, Any], where: str,
                keep_judge_turns: bool) -> list[Item]:
    """One item per user turn; its history holds the dataset's reference answers, not the model's."""
    items: list[Item] = []
    turns: list[tuple[list[dict[str, Any]], str]] = []
    start = 1 if messages and messages[0]["role"] == "system" else 0
    for i in range(start, len(messages), 2):
        user = messages[i]
        if user["role"] != "user":
            raise DataError(f"{where}: message {i} should be a user turn (roles must alternate user/assistant), got '{user['role']}'")
        if i + 1 >= len(messages) or messages[i + 1]["role"] != "assistant":
            raise DataError(f"{where}: user message {i} has no reference answer after it")
        reference = messages[i + 1]["content"]
        turns.append((user["content"], reference))
        turn = len(turns) - 1
        items.append(Item(
            id=f"{id_prefix}:{turn}",
            messages=messages[: i + 1],
            reference=reference,
            meta={**meta, "turn": turn, "question": text_of(user["content"])},
            judge_turns=list(turns) if keep_judge_turns else None,
        ))
    if not items:
        raise DataError(f"{where}: conversation has no user turn")
    return items


def _normalise_message(message: Any, where: str, image_for: Callable[[dict[str, Any]], EncodedImage]) -> dict[str, Any]:
    if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
        raise DataError(f"{where}: each message needs a role of system/user/assistant, got {str(message)[:80]}")
    content = message.get("content")
    if message["role"] != "user":
        return {"role": message["role"], "content": text_of(content)}
    if isinstance(content, str):
        return {"role": "user", "content": [{"type": "text", "text": content}]}
    if not isinstance(content, list):
        raise DataError(f"{where}: user content must be a string or a list of parts")
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": part.get("text", "")})
        elif kind in ("image", "image_url"):
            parts.append(_image_part(image_for(part)))
        else:
            raise DataError(f"{where}: unknown content part {str(part)[:80]}")
    return {"role": "user", "content": parts}


# ------------------------------------------------------------------------------- MM-MT-Bench


def load_mm_mt_bench(path: str | Path, limit: int | None = None) -> Dataset:
    """`mistralai/MM-MT-Bench`, split `eval`: `image`, `conversation` (JSON string), `category`.

    The conversation's first user message starts with an `{"type": "image"}` placeholder; the pixels
    are in the `image` column (one image per conversation).
    """
    files = resolve_table_files(path, "eval")
    items: list[Item] = []
    records = 0
    for row in iter_rows(files, ["image", "conversation", "category"], limit):
        records += 1
        where = row.where("conversation")
        raw = row.required("conversation")
        try:
            conversation = json.loads(raw) if isinstance(raw, str) else raw
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc})") from exc
        if isinstance(conversation, dict):  # early copies wrapped the list as {"messages": [...]}
            conversation = conversation.get("messages")
        if not isinstance(conversation, list) or not conversation:
            raise DataError(f"{where}: expected a JSON list of messages")
        image = row.image("image")
        messages = [_normalise_message(m, where, lambda part: image) for m in conversation]
        first = messages[0]["content"]
        if not first or first[0]["type"] != "image":
            raise DataError(f"{where}: the first user message must start with the image placeholder")
        meta = {"category": str(row.required("category")), "conversation": row.index}
        items.extend(_turn_items(messages, str(row.index), meta, where, keep_judge_turns=True))
    root = Path(path).expanduser()
    return Dataset("mm_mt_bench", files, hash_files(files, root if root.is_dir() else root.parent),
                   total=len(items), records=records, stream=lambda: iter(items))


# ------------------------------------------------------------------------------------- synth

SYNTH_CATEGORIES = ("charts", "tables", "documents", "diagrams", "misc")


def load_synth(path: str | Path, limit: int | None = None) -> Dataset:
    """Our synthetic test split (`pixtral data synth --out DIR`): `DIR/test.jsonl` plus its images.

    Each line: `{"id", "category", "messages"}`; image URLs are paths relative to the JSONL file
    (or data URIs). Every assistant turn is scored, with the reference answers as history. The
    hash covers the JSONL file and every image it references, whatever `limit` is.
    """
    import hashlib

    file = Path(path).expanduser()
    if file.is_dir():
        file = file / "test.jsonl"
    if not file.is_file():
        raise DataError(f"{file}: no such file (pass the folder written by `pixtral data synth --out DIR`)")
    digest = hashlib.sha256(file.read_bytes())
    images: dict[str, EncodedImage] = {}

    def image_for(part: dict[str, Any], where: str) -> EncodedImage:
        spec = part.get("image_url")
        url = spec.get("url") if isinstance(spec, dict) else spec
        if not isinstance(url, str) or not url:
            raise DataError(f"{where}: image part has no image_url.url")
        if url not in images:
            if url.startswith("data:"):
                images[url] = EncodedImage.from_bytes(decode_data_uri(url), where)
            else:
                images[url] = EncodedImage.from_file(file.parent / url, f"{where}: image {url}")
                digest.update(f"{url}\0{images[url].sha256}\n".encode())
        return images[url]

    conversations: list[list[Item]] = []
    seen: set[str] = set()
    with open(file, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{file} line {lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc})") from exc
            missing = [key for key in ("id", "category", "messages") if key not in record]
            if missing:
                raise DataError(f"{where}: missing field(s) {', '.join(missing)}")
            record_id = str(record["id"])
            if record_id in seen:
                raise DataError(f"{where}: duplicate id '{record_id}'")
            seen.add(record_id)
            if not isinstance(record["messages"], list):
                raise DataError(f"{where}: field 'messages' must be a list")
            messages = [_normalise_message(m, where, lambda part: image_for(part, where)) for m in record["messages"]]
            meta = {"category": str(record["category"]), "record": record_id}
            conversations.append(_turn_items(messages, record_id, meta, where, keep_judge_turns=False))
    if not conversations:
        raise DataError(f"{file}: no records")
    kept = conversations[:limit] if limit is not None else conversations
    items = [item for turns in kept for item in turns]
    return Dataset("synth", [file], digest.hexdigest(), total=len(items), records=len(kept), stream=lambda: iter(items))


# ------------------------------------------------------------------------------------ registry

LOADERS: dict[str, Callable[..., Dataset]] = {
    "mm_mt_bench": load_mm_mt_bench,
    "mmmu": load_mmmu,
    "mathvista": load_mathvista,
    "chartqa": load_chartqa,
    "docvqa": load_docvqa,
    "vqav2": load_vqav2,
    "synth": load_synth,
    # The language tasks read their own formats (JSONL, CSV, JSON folders) in their modules.
    "mt_bench": lambda path, limit: _language_loader("mt_bench")(path, limit),
    "mmlu": lambda path, limit: _language_loader("mmlu")(path, limit),
    "math": lambda path, limit: _language_loader("math_data")(path, limit),
    "humaneval": lambda path, limit: _language_loader("humaneval")(path, limit),
}


def _language_loader(module: str) -> Callable[..., Dataset]:
    import importlib

    return importlib.import_module(f"pixtral.eval.{module}").load


def load(task: str, path: str | Path, limit: int | None = None, blank_images: bool = False) -> Dataset:
    """The task's dataset from a local path; `blank_images` swaps each image for a white one of the same size."""
    dataset = LOADERS[task](path, limit)
    if blank_images:
        stream = dataset.stream
        dataset.stream = lambda: (blank_item(item) for item in stream())
    return dataset


def blank_item(item: Item) -> Item:
    """The item with every image the model sees replaced by a white image of the same size."""
    def blank(message: dict[str, Any]) -> dict[str, Any]:
        content = message.get("content")
        if not isinstance(content, list):
            return message
        return {**message, "content": [_image_part(p["image"].blank_like()) if p.get("type") == "image" else p
                                       for p in content]}

    return Item(item.id, [blank(m) for m in item.messages], item.reference, item.meta, item.judge_turns)

