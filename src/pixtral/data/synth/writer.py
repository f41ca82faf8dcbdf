"""Split and write a synthetic data set: DIR/images/*.png, DIR/{train,val,test}.jsonl,
DIR/pretrain.jsonl and DIR/manifest.json.

`pretrain.jsonl` holds one interleaved document per training image (the image, then every
label, value and object in it), in the trainer's document format; the paper pre-trains on such
documents before instruction tuning, and here they supervise every fact of an image at once
where a question supervises one. `documents="reading"` lists the facts in reading order
(`Sample.description`), `"lookup"` keyed by what a question would name and in random order
(`Sample.lookup`), `"ranked"` largest first where a question compares (`Sample.ranked`). `"both"` writes the reading-order documents to `pretrain.jsonl` and the lookup
ones about the same images to `pretrain_lookup.jsonl`: one set of images for a recipe that trains
on both (or on one, then the other). `questions="all"` asks every question template of a category
about each image, for training data that gets more answers out of each image.

Every file is written to a temporary name and renamed into place, the JSONL files only
after all their images exist and the manifest last: an interrupted run leaves no JSONL
file or manifest that looks complete. Output depends only on (seed, n, fractions,
categories), not on the number of worker processes.
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing
import os
import re
import signal
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pixtral.data.synth.base import Turn
from pixtral.data.synth.draw import MAX_SIDE, MIN_SIDE, VIEW
from pixtral.data.synth.generate import CATEGORIES, GENERATOR_VERSION, LAYOUTS, QUESTION_SETS, generate_sample
from pixtral.errors import PixtralError

SPLITS = ("train", "val", "test")
PRETRAIN = "pretrain"  # documents about the train split's images only
PRETRAIN_LOOKUP = "pretrain_lookup"  # with documents="both": the lookup-order documents
OUTPUTS = (*SPLITS, PRETRAIN, PRETRAIN_LOOKUP)
IMAGE_DIR = "images"
MANIFEST = "manifest.json"
MAX_N = 10_000_000
MAX_WORKERS = 64
DOCUMENT_ORDERS = ("reading", "lookup", "ranked", "both")
_OUR_IMAGE = re.compile(r"^\d{6,}\.png$")


@dataclass(frozen=True)
class SynthConfig:
    out: Path
    n: int
    seed: int = 0
    val_frac: float = 0.05
    test_frac: float = 0.05
    categories: tuple[str, ...] = CATEGORIES
    workers: int = 1
    overwrite: bool = False
    compress_level: int = 1  # PNG zlib level: 1 is fast, files are mostly white anyway
    documents: str = "reading"  # the text of pretrain.jsonl (and pretrain_lookup.jsonl): one of DOCUMENT_ORDERS
    layout: str = "free"  # "grid": labels, values and objects in the default model's token cells
    questions: str = "some"  # "all": every question template about each image (training data)


def split_counts(n: int, val_frac: float, test_frac: float) -> dict[str, int]:
    """Conversations per split: val and test get round(n * frac) (halves round up), train the rest."""
    val = math.floor(n * val_frac + 0.5)
    test = math.floor(n * test_frac + 0.5)
    return {"train": n - val - test, "val": val, "test": test}


def conversation(record_id: str, category: str, turns: list[Turn], image_url: str) -> dict:
    """A JSONL record in the chat format; only the first user message carries the image.

    `templates` (one per turn, e.g. "charts.tallest") is extra to the chat format, for
    per-template evaluation.
    """
    messages: list[dict] = []
    for i, turn in enumerate(turns):
        if i == 0:
            content = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": turn.question}]
        else:
            content = turn.question
        messages.append({"role": "user", "content": content})
        messages.append({"role": "assistant", "content": turn.answer})
    return {
        "id": record_id,
        "category": category,
        "messages": messages,
        "templates": [turn.template for turn in turns],
    }


def document(record_id: str, category: str, text: str, image_url: str) -> dict:
    """A JSONL record in the interleaved-document format: the image, then `text` about it."""
    return {
        "id": record_id,
        "category": category,
        "content": [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": text}],
    }


def check_config(config: SynthConfig) -> None:
    """Raise PixtralError naming the option at fault."""
    n = config.n
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise PixtralError(f"--n must be an integer from 1 to {MAX_N:,} (the total number of conversations), got {n!r}")
    if isinstance(config.seed, bool) or not isinstance(config.seed, int):
        raise PixtralError(f"--seed must be an integer, got {config.seed!r}")
    for name, frac in (("--val-frac", config.val_frac), ("--test-frac", config.test_frac)):
        if not isinstance(frac, (int, float)) or not 0.0 <= frac < 1.0:
            raise PixtralError(f"{name} must be a fraction in [0, 1), got {frac!r}")
    if config.val_frac + config.test_frac >= 1.0:
        raise PixtralError(f"--val-frac + --test-frac must be below 1 to leave a training split, "
                           f"got {config.val_frac} + {config.test_frac}")
    if not config.categories:
        raise PixtralError(f"--categories must name at least one of: {', '.join(CATEGORIES)}")
    unknown = [c for c in config.categories if c not in CATEGORIES]
    if unknown:
        raise PixtralError(f"--categories: unknown category {unknown[0]!r}; choose from {', '.join(CATEGORIES)}")
    if len(set(config.categories)) != len(config.categories):
        raise PixtralError(f"--categories lists a category twice: {','.join(config.categories)}")
    if not isinstance(config.workers, int) or not 1 <= config.workers <= MAX_WORKERS:
        raise PixtralError(f"--workers must be an integer from 1 to {MAX_WORKERS}, got {config.workers!r}")
    if config.layout not in LAYOUTS:
        raise PixtralError(f"--layout must be one of {', '.join(LAYOUTS)}, got {config.layout!r}")
    if config.questions not in QUESTION_SETS:
        raise PixtralError(f"--questions must be one of {', '.join(QUESTION_SETS)}, got {config.questions!r}")
    if config.documents not in DOCUMENT_ORDERS:
        raise PixtralError(f"--documents must be one of {', '.join(DOCUMENT_ORDERS)}, got {config.documents!r}")
    if not 0 <= config.compress_level <= 9:
        raise PixtralError(f"PNG compress_level must be 0..9, got {config.compress_level!r}")


def _prepare_out(out: Path, overwrite: bool) -> Path:
    """Create `out` (and out/images); clear a previous synth output there if allowed."""
    if out.exists() and not out.is_dir():
        raise PixtralError(f"--out {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PixtralError(f"--out {out}: cannot create the output directory ({exc.strerror or exc})") from exc
    if not os.access(out, os.W_OK | os.X_OK):
        raise PixtralError(f"--out {out}: the directory is not writable")
    images = out / IMAGE_DIR
    if any(out.iterdir()):
        if not overwrite:
            raise PixtralError(f"--out {out} is not empty; pass --overwrite to replace a previous "
                               f"`pixtral data synth` output there, or choose an empty directory")
        # Manifest first: from here on the directory no longer looks complete.
        for name in (MANIFEST, *(f"{s}.jsonl" for s in OUTPUTS)):
            (out / name).unlink(missing_ok=True)
        for path in out.glob(".*.tmp"):
            path.unlink()
        if images.is_dir():
            for path in images.iterdir():
                if _OUR_IMAGE.match(path.name) or (path.name.startswith(".") and path.name.endswith(".tmp")):
                    path.unlink()
    try:
        images.mkdir(exist_ok=True)
        probe = out / f".write-probe-{os.getpid()}.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise PixtralError(f"--out {out}: cannot write there ({exc.strerror or exc})") from exc
    return images


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _document_files(documents: str) -> dict[str, str]:
    """{output name: document order} for a `documents` setting."""
    if documents == "both":
        return {PRETRAIN: "reading", PRETRAIN_LOOKUP: "lookup"}
    return {PRETRAIN: documents}


def _make(job: tuple[int, int, str, str, int, str, str, str]) -> tuple[list[Turn], str, dict[str, str]]:
    """Generate one sample and write its image atomically; runs in worker processes.

    Returns its turns, category and {document output name: the document's text}."""
    seed, index, category, image_path, compress_level, documents, layout, questions = job
    sample = generate_sample(seed, index, category, layout, questions)
    buf = io.BytesIO()
    sample.image.save(buf, format="PNG", compress_level=compress_level)
    _write_atomic(Path(image_path), buf.getvalue())
    texts = {"reading": sample.description, "lookup": sample.lookup, "ranked": sample.ranked}
    return sample.turns, sample.category, {name: texts[order] for name, order in _document_files(documents).items()}


def _ignore_sigint() -> None:
    """Workers leave Ctrl-C to the parent, which stops them and cleans up."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _jobs(config: SynthConfig, images: Path, counts: dict[str, int]) -> Iterator[tuple]:
    digits = max(6, len(str(config.n - 1)))
    index = 0
    for split in SPLITS:
        for j in range(counts[split]):
            category = config.categories[j % len(config.categories)]
            yield split, j, index, (config.seed, index, category, str(images / f"{index:0{digits}d}.png"),
                                    config.compress_level, config.documents, config.layout, config.questions)
            index += 1


def write_dataset(config: SynthConfig, progress: bool = True) -> dict:
    """Write the data set described by `config`; return the manifest written.

    Raises PixtralError for a bad option or an output directory that cannot be used.
    """
    check_config(config)
    out = Path(config.out)
    images = _prepare_out(out, config.overwrite)
    counts = split_counts(config.n, config.val_frac, config.test_frac)
    jobs = list(_jobs(config, images, counts))
    per_split: dict[str, Counter] = {s: Counter() for s in SPLITS}
    per_template: dict[str, Counter] = {s: Counter() for s in SPLITS}
    turns_total = {s: 0 for s in SPLITS}

    outputs = (*SPLITS, *_document_files(config.documents))
    tmp_paths = {s: out / f".{s}.jsonl.tmp" for s in outputs}
    files = {s: open(tmp_paths[s], "w", encoding="utf-8", newline="\n") for s in outputs}
    pool = None
    try:
        payloads = [job[3] for job in jobs]
        if config.workers > 1 and len(jobs) > 1:
            pool = multiprocessing.get_context("spawn").Pool(min(config.workers, len(jobs)), initializer=_ignore_sigint)
            results = pool.imap(_make, payloads, chunksize=8)
        else:
            results = map(_make, payloads)
        bar = _progress(config.n, out, progress)
        for (split, j, index, payload), (turns, category, facts) in zip(jobs, results):
            url = f"{IMAGE_DIR}/{Path(payload[3]).name}"
            record = conversation(f"{split}-{j}", category, turns, url)
            files[split].write(json.dumps(record, ensure_ascii=False) + "\n")
            if split == "train":
                for name, text in facts.items():
                    doc = document(f"{split}-{j}", category, text, url)
                    files[name].write(json.dumps(doc, ensure_ascii=False) + "\n")
            per_split[split][category] += 1
            per_template[split].update(t.template for t in turns)
            turns_total[split] += len(turns)
            bar.update(1)
        bar.close()
        for s in outputs:
            files[s].close()
        for s in outputs:
            os.replace(tmp_paths[s], out / f"{s}.jsonl")
    except BaseException:
        if pool is not None:
            pool.terminate()
            pool.join()
            pool = None
        for s in outputs:
            files[s].close()
            tmp_paths[s].unlink(missing_ok=True)
        for tmp in images.glob(".*.tmp"):  # an image cut off while being written
            tmp.unlink(missing_ok=True)
        raise
    finally:
        if pool is not None:
            pool.close()
            pool.join()

    manifest = {
        "generator": "pixtral.data.synth",
        "version": GENERATOR_VERSION,
        "seed": config.seed,
        "n": config.n,
        "categories": list(config.categories),
        "layout": config.layout,
        "questions": config.questions,
        "fractions": {"val": config.val_frac, "test": config.test_frac},
        "image_dir": IMAGE_DIR,
        "image_sides": [MIN_SIDE, MAX_SIDE],
        "view_longest_side": VIEW,
        "splits": {
            s: {
                "file": f"{s}.jsonl",
                "count": counts[s],
                "turns": turns_total[s],
                "categories": {c: per_split[s][c] for c in config.categories},
                "templates": dict(sorted(per_template[s].items())),
            }
            for s in SPLITS
        },
    }
    for name, order in _document_files(config.documents).items():
        manifest[name] = {"file": f"{name}.jsonl", "count": counts["train"], "format": "document", "order": order}
    _write_atomic(out / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


def _progress(total: int, out: Path, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=f"writing {out}", unit="conv", disable=not enabled, dynamic_ncols=True)
