"""Dataset plumbing shared by the task loaders: items, files, hashing and row iteration.

Benchmarks are read from local copies in the public datasets' own formats: Hugging Face parquet
shards (`data/<split>-0000x-of-0000y.parquet`), `datasets.save_to_disk` folders (`*.arrow`), or,
for `synth`, our JSONL split. Rows are streamed batch by batch, so large splits (VQAv2) are never
loaded whole.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from pixtral.eval.errors import DataError
from pixtral.eval.images import EncodedImage

KNOWN_SPLITS = ("train", "validation", "val", "test", "testmini", "dev", "eval")
TABLE_SUFFIXES = (".parquet", ".arrow")


@dataclass
class Item:
    """One scored request: the messages to send and what to score the answer against.

    `messages` are OpenAI chat messages whose image parts are `{"type": "image", "image": EncodedImage}`;
    they become `image_url` data URIs only when sent. `reference` and `meta` are JSON-serialisable.
    """

    id: str
    messages: list[dict[str, Any]]
    reference: Any
    meta: dict[str, Any] = field(default_factory=dict)
    # MM-MT-Bench: the conversation up to the graded turn, [(user content parts, reference text), ...].
    judge_turns: list[tuple[list[dict[str, Any]], str]] | None = None


@dataclass
class Dataset:
    """A task's data: where it came from, its hash, how many items, and a way to stream them."""

    task: str
    files: list[Path]
    sha256: str
    total: int  # items after --limit (for the progress bar)
    records: int  # dataset rows after --limit
    stream: Callable[[], Iterator[Item]]

    def items(self) -> Iterator[Item]:
        return self.stream()


def to_openai_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as sent on the wire: images become `image_url` parts holding base64 data URIs, and
    text-only part lists become plain strings (which every OpenAI-compatible server accepts)."""
    wire = []
    for message in messages:
        message = _map_images(message, lambda img: {"type": "image_url", "image_url": {"url": img.data_uri()}})
        content = message.get("content")
        if isinstance(content, list) and all(p.get("type") == "text" for p in content):
            message["content"] = text_of(content)
        wire.append(message)
    return wire


def loggable_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as recorded in TASK.items.jsonl: images described (size, hash), not embedded."""
    return [_map_images(m, lambda img: {"type": "image", "image": img.describe()}) for m in messages]


def _map_images(message: dict[str, Any], fn: Callable[[EncodedImage], dict[str, Any]]) -> dict[str, Any]:
    content = message.get("content")
    if not isinstance(content, list):
        return dict(message)
    parts = [fn(p["image"]) if p.get("type") == "image" else dict(p) for p in content]
    return {**message, "content": parts}


def text_of(content: Any) -> str:
    """The text of a message content (a string, or the text parts of a part list, joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return "" if content is None else str(content)


# ----------------------------------------------------------------------------------------- files


def read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-blank line of a JSONL file (gzipped when it ends in .gz);
    an unreadable file, bad JSON or a line that is not an object is a DataError naming the line."""
    opener = gzip.open if path.name.endswith(".gz") else open
    rows = []
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path} line {number}: not valid JSON ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path} line {number}: expected a JSON object, got {type(row).__name__}")
                rows.append((number, row))
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc
    return rows


def _split_of(path: Path) -> str | None:
    """The split a file holds, from its name (`validation-00000-of-00002.parquet`,
    `vq_av2-validation-00003-of-00010.arrow`) or its folder (`validation/data-00000-of-00001.arrow`)."""
    for token in path.name.split(".", 1)[0].split("-"):
        if token in KNOWN_SPLITS:
            return token
    return path.parent.name if path.parent.name in KNOWN_SPLITS else None


def resolve_table_files(path: str | Path, split: str, config: str | None = None) -> list[Path]:
    """The parquet/arrow files holding `split` of a dataset given as a file or a folder.

    A folder may be a Hugging Face dataset snapshot (`data/<split>-*.parquet`, or
    `<config>/<split>-*.parquet`) or a `save_to_disk` folder (`<split>/data-*.arrow`).
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"{root}: no such file or directory (pass the dataset's local copy with --data)")
    if root.is_file():
        if root.suffix not in TABLE_SUFFIXES:
            raise DataError(f"{root}: expected a .parquet or .arrow file, or a dataset folder")
        return [root]
    if config and (root / config).is_dir():
        root = root / config
    files = sorted(
        p for p in root.rglob("*")
        if p.suffix in TABLE_SUFFIXES and p.is_file() and not p.name.startswith("cache-")
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise DataError(f"{root}: no .parquet or .arrow files in this folder")
    chosen = [p for p in files if _split_of(p) == split]
    if chosen:
        return chosen
    found = sorted({s for s in map(_split_of, files) if s})
    if found:
        raise DataError(f"{root}: no files for split '{split}' (found splits: {', '.join(found)})")
    return files


def hash_files(files: list[Path], root: Path | None = None) -> str:
    """sha256 over the files' names (relative to `root`) and contents, in order."""
    outer = hashlib.sha256()
    for path in files:
        inner = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                inner.update(chunk)
        name = str(path.relative_to(root)) if root and path.is_relative_to(root) else path.name
        outer.update(f"{name}\0{inner.hexdigest()}\n".encode())
    return outer.hexdigest()


def _arrow_batches(path: Path):
    """(schema names, record batches) of a `.arrow` file, stream or file format, memory-mapped."""
    import pyarrow as pa

    source = pa.memory_map(str(path))
    try:
        reader = pa.ipc.open_stream(source)  # what `datasets.save_to_disk` writes
        return reader.schema.names, iter(reader)
    except pa.ArrowInvalid:
        reader = pa.ipc.open_file(source)
        return reader.schema.names, (reader.get_batch(i) for i in range(reader.num_record_batches))


def _table_errors():
    import pyarrow as pa

    return (OSError, pa.ArrowException)


def _open_table_batches(path: Path, columns: list[str]) -> Iterator[list[dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        if path.suffix == ".parquet":
            pf = pq.ParquetFile(path)
            names = pf.schema_arrow.names
            batches = pf.iter_batches(batch_size=64, columns=[c.rstrip("?") for c in columns if c.rstrip("?") in names])
        else:
            names, batches = _arrow_batches(path)
        _check_columns(path, names, columns)
        for batch in batches:
            if path.suffix != ".parquet":
                batch = batch.select([c.rstrip("?") for c in columns if c.rstrip("?") in names])
            yield batch.to_pylist()
    except _table_errors() as exc:
        raise DataError(f"{path}: cannot read as {path.suffix[1:]} ({exc})") from exc


def _check_columns(path: Path, names: list[str], columns: list[str]) -> None:
    # Columns named with a trailing "?" are optional.
    missing = [c for c in columns if c not in names and not c.endswith("?")]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(names)})")


def count_rows(files: list[Path]) -> int:
    import pyarrow.parquet as pq

    total = 0
    for path in files:
        try:
            if path.suffix == ".parquet":
                total += pq.ParquetFile(path).metadata.num_rows
            else:
                total += sum(batch.num_rows for batch in _arrow_batches(path)[1])
        except _table_errors() as exc:
            raise DataError(f"{path}: cannot read as {path.suffix[1:]} ({exc})") from exc
    return total


@dataclass
class Row:
    values: dict[str, Any]
    index: int  # position in the whole split (all files, in order)
    path: Path
    base_dir: Path

    def where(self, column: str | None = None) -> str:
        return f"{self.path} row {self.index}" + (f" field '{column}'" if column else "")

    def get(self, column: str, default: Any = None) -> Any:
        return self.values.get(column, default)

    def required(self, column: str) -> Any:
        value = self.values.get(column)
        if value is None:
            raise DataError(f"{self.where(column)}: value is missing (null)")
        return value

    def image(self, column: str) -> EncodedImage:
        return EncodedImage.from_cell(self.required(column), self.base_dir, self.where(column))


def iter_rows(files: list[Path], columns: list[str], limit: int | None = None) -> Iterator[Row]:
    """Rows of the split with the given columns (names ending in "?" are optional), in file order."""
    wanted = [c.rstrip("?") for c in columns]
    index = 0
    for path in files:
        for batch in _open_table_batches(path, columns):
            for values in batch:
                if limit is not None and index >= limit:
                    return
                yield Row({k: values.get(k) for k in wanted}, index, path, path.parent)
                index += 1
