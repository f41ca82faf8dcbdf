"""Test kit for the evaluation harness: fixture datasets in the public formats, and a scripted
OpenAI-compatible server (FastAPI + uvicorn on a free localhost port, in a thread)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image

from pixtral.eval import prompts

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # Hugging Face `Image` feature


def png(width: int, height: int, color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def image_cell(width: int, height: int, color=(200, 30, 30)) -> dict:
    return {"bytes": png(width, height, color), "path": None}


def write_parquet(path: Path, columns: dict[str, list], types: dict[str, pa.DataType] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    types = types or {}
    arrays = {name: pa.array(values, type=types.get(name)) for name, values in columns.items()}
    pq.write_table(pa.table(arrays), path)
    return path


# ------------------------------------------------------------------------- fixture datasets
# Each builder returns (data path, {question: model reply}) so a scripted endpoint can answer.

CHARTQA = [
    # question, gold, type, scripted reply
    ("What is the top value?", "42", "human_test", "The top bar reads 42.\nFinal Answer: 42"),
    ("Is it rising?", "Yes", "human_test", "It goes up.\nAnswer: Yes"),
    ("What is the 2019 share?", "14.8", "augmented_test", "**Answer:** 15"),
    ("How many bars?", "6", "augmented_test", "The answer is 6000."),
    ("Which city?", "Paris", "human_test", "Final Answer: London"),
    ("What ratio?", "0.25", "augmented_test", "Final Answer: 25%"),
]
CHARTQA_EXPECTED = {
    "metrics": {"baseline": 2 / 6, "flexible_level_1": 3 / 6, "flexible_level_2": 4 / 6, "flexible_level_3": 5 / 6},
    "mistral_evals": {"explicit_prompt_relaxed_correctness": 4 / 6, "anywhere_in_answer_relaxed_correctness": 5 / 6},
}


def make_chartqa(root: Path) -> tuple[Path, dict[str, str]]:
    write_parquet(root / "data" / "test-00000-of-00001.parquet", {
        "type": [t for _, _, t, _ in CHARTQA],
        "question": [q for q, _, _, _ in CHARTQA],
        "answer": [a for _, a, _, _ in CHARTQA],
        "image": [image_cell(40 + i, 30) for i in range(len(CHARTQA))],
    }, {"image": IMAGE_TYPE})
    return root, {q: reply for q, _, _, reply in CHARTQA}


MATHVISTA = [
    # question, choices, answer, question_type, reply
    ("Which count?", ["3", "4", "5"], "4", "multi_choice", "Final Answer: B"),
    ("What is x?", None, "1.5", "free_form", "Final Answer: 1.50"),
    ("How long?", None, "10", "free_form", "Final Answer: 10.4"),
    ("Which color?", ["red", "blue"], "red", "multi_choice", "The correct option is A."),
]
MATHVISTA_EXPECTED = {
    "metrics": {"baseline": 2 / 4, "flexible_level_1": 2 / 4, "flexible_level_2": 2 / 4, "flexible_level_3": 4 / 4},
    "mistral_evals": {"explicit_prompt_relaxed_correctness": 3 / 4, "anywhere_in_answer_relaxed_correctness": 3 / 4},
}


def make_mathvista(root: Path) -> tuple[Path, dict[str, str]]:
    queries = [f"Hint: answer the question.\nQuestion: {q}" for q, *_ in MATHVISTA]
    write_parquet(root / "data" / "testmini-00000-of-00001.parquet", {
        "pid": [str(i + 1) for i in range(len(MATHVISTA))],
        "question": [q for q, *_ in MATHVISTA],
        "image": [f"images/{i + 1}.jpg" for i in range(len(MATHVISTA))],
        "decoded_image": [image_cell(20, 20 + i) for i in range(len(MATHVISTA))],
        "choices": [c for _, c, *_ in MATHVISTA],
        "answer": [a for _, _, a, _, _ in MATHVISTA],
        "question_type": [t for *_, t, _ in MATHVISTA],
        "query": queries,
    }, {"decoded_image": IMAGE_TYPE, "choices": pa.list_(pa.string())})
    return root, {q: row[-1] for q, row in zip(queries, MATHVISTA)}


MMMU = [
    # id, question, options, type, answer, images used, reply
    ("validation_Art_1", "Which shape is in <image 1>?", "['circle', 'square', 'triangle']", "multiple-choice", "C",
     "**Final Answer:** C"),
    ("validation_Math_2", "<image 1> and <image 2>: how many dots in total?", "[]", "open", "['7', 'seven']",
     "Final Answer: seven"),
    ("validation_Art_3", "What color is this? <image 2>", "[]", "open", "blue", "Answer: Blue."),
]
MMMU_EXPECTED = {
    "metrics": {"baseline": 1 / 3, "flexible_level_1": 2 / 3, "flexible_level_2": 1.0, "flexible_level_3": 1.0},
    "mistral_evals": {"explicit_prompt_relaxed_correctness": 2 / 3, "anywhere_in_answer_relaxed_correctness": 2 / 3},
}


def make_mmmu(root: Path) -> tuple[Path, dict[str, str]]:
    columns: dict[str, list] = {
        "id": [r[0] for r in MMMU], "question": [r[1] for r in MMMU], "options": [r[2] for r in MMMU],
        "explanation": [""] * len(MMMU), "question_type": [r[3] for r in MMMU], "answer": [r[4] for r in MMMU],
    }
    for k in range(1, 8):
        columns[f"image_{k}"] = [image_cell(10 * k, 12) if k <= 2 else None for _ in MMMU]
    write_parquet(root / "data" / "validation-00000-of-00001.parquet", columns,
                  {f"image_{k}": IMAGE_TYPE for k in range(1, 8)})
    # A dev split in the same folder must be ignored.
    write_parquet(root / "data" / "dev-00000-of-00001.parquet", {**{k: v[:1] for k, v in columns.items()}},
                  {f"image_{k}": IMAGE_TYPE for k in range(1, 8)})
    return root, {"Which shape": MMMU[0][-1], "how many dots": MMMU[1][-1], "What color is this": MMMU[2][-1]}


DOCVQA = [
    (["42"], "What is the total?", "42"),
    (["invoice"], "What kind of document?", "The answer is invoice"),
    (["Dr. Smith", "smith"], "Who signed?", "Smyth"),
]
DOCVQA_EXPECTED = {"metrics": {"anls": (1 + 0 + 0.8) / 3},
                   "mistral_evals": {"anls": (1 + (1 - 14 / 21) + 0.8) / 3}}


def make_docvqa(root: Path) -> tuple[Path, dict[str, str]]:
    columns = {
        "questionId": [str(100 + i) for i in range(len(DOCVQA))],
        "question": [q for _, q, _ in DOCVQA],
        "question_types": [["form"]] * len(DOCVQA),
        "image": [image_cell(50, 60) for _ in DOCVQA],
        "docId": list(range(len(DOCVQA))),
        "answers": [a for a, _, _ in DOCVQA],
        "data_split": ["validation"] * len(DOCVQA),
    }
    write_parquet(root / "DocVQA" / "validation-00000-of-00001.parquet", columns,
                  {"image": IMAGE_TYPE, "answers": pa.list_(pa.string())})
    # The InfographicVQA config next to it must be ignored.
    write_parquet(root / "InfographicVQA" / "validation-00000-of-00001.parquet", {"question": ["x"]})
    return root, {q: reply for _, q, reply in DOCVQA}


VQAV2 = [
    (["yes"] * 10, "Is there a dog?", "Yes"),
    (["2"] * 2 + ["3"] * 8, "How many cats?", "Two"),
    (["red"] * 3 + ["dark red"] * 7, "What color is the car?", "red"),
]
VQAV2_EXPECTED = {"metrics": {"vqa_match": (1 + 0.6 + 0.9) / 3}, "mistral_evals": {"vqa_match": 1 / 3}}


def make_vqav2(root: Path) -> tuple[Path, dict[str, str]]:
    answer_type = pa.list_(pa.struct([("answer", pa.string()), ("answer_confidence", pa.string()),
                                      ("answer_id", pa.int64())]))
    write_parquet(root / "data" / "validation-00000-of-00001.parquet", {
        "question_type": ["what"] * len(VQAV2),
        "multiple_choice_answer": [a[0] for a, _, _ in VQAV2],
        "answers": [[{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(golds)]
                    for golds, _, _ in VQAV2],
        "image_id": list(range(len(VQAV2))),
        "answer_type": ["other"] * len(VQAV2),
        "question_id": [1000 + i for i in range(len(VQAV2))],
        "question": [q for _, q, _ in VQAV2],
        "image": [image_cell(30, 30) for _ in VQAV2],
    }, {"image": IMAGE_TYPE, "answers": answer_type})
    return root, {q: reply for _, q, reply in VQAV2}


# MM-MT-Bench: (category, image size, [(question, reference)], ...)
MM_MT_BENCH = [
    ("charts", (64, 48), [("What is the highest bar?", "Bar B is the highest.")]),
    ("tables", (80, 40), [("Sum the first column.", "The sum is 10."), ("And the mean?", "The mean is 2.5.")]),
    ("diagrams", (50, 70), [("Describe the arrow.", "It points left.")]),
]
# Judge replies per graded question; the last has no rating at all.
JUDGE_REPLIES = {
    "What is the highest bar?": "Correct and complete. Rating: [[8]]",
    "Sum the first column.": "Mostly right.\nRating: [[6]]",
    "And the mean?": "Good. Rating: [[7.5]]. (Not [[2]].)",
    "Describe the arrow.": "I cannot decide.",
}
MM_MT_BENCH_EXPECTED = {
    "metrics": {"micro_average": (8 + 6 + 7.5) / 3, "per_category": {"charts": 8.0, "tables": 6.75},
                "per_turn": {"1": 7.0, "2": 7.5}, "unrated_turns": 1},
    "mistral_evals": {"micro_average_score": (8 + 6 + 7.5) / 3, "macro_average_score": (8 + 6.75 + 7 + 7.5) / 4,
                      "charts_average": 8.0, "tables_average": 6.75, "0_average": 7.0, "1_average": 7.5},
}


def model_reply_for(question: str) -> str:
    return f"My answer to: {question}"


def make_mm_mt_bench(root: Path) -> tuple[Path, dict[str, str]]:
    conversations, images, categories = [], [], []
    for category, (w, h), turns in MM_MT_BENCH:
        messages = []
        for t, (question, reference) in enumerate(turns):
            content = [{"type": "text", "text": question}]
            if t == 0:
                content.insert(0, {"type": "image"})
            messages.append({"role": "user", "content": content})
            messages.append({"role": "assistant", "content": [{"type": "text", "text": reference}]})
        conversations.append(json.dumps(messages))
        images.append(image_cell(w, h, (10, 120, 200)))
        categories.append(category)
    write_parquet(root / "data" / "eval-00000-of-00001.parquet",
                  {"image": images, "conversation": conversations, "category": categories}, {"image": IMAGE_TYPE})
    replies = {q: model_reply_for(q) for _, _, turns in MM_MT_BENCH for q, _ in turns}
    return root, replies


# synth: id, category, [(question, reference, reply)]
SYNTH = [
    ("s1", "charts", (40, 40), [("What is the max?", "42", "42")]),
    ("s2", "tables", (60, 30), [("Which row is first?", "Alpha", "Answer: Alpha."), ("How many rows?", "3", "**3**")]),
    ("s3", "documents", (30, 60), [("Title?", "Annual Report", "The title is Annual Report, at the top")]),
    ("s4", "misc", (20, 20), [("Color?", "red", "blue")]),
]
SYNTH_EXPECTED = {
    "metrics": {"baseline": 1 / 5, "flexible_level_1": 2 / 5, "flexible_level_2": 3 / 5, "flexible_level_3": 4 / 5},
    "per_category_baseline": {"charts": 1.0, "tables": 0.0, "documents": 0.0, "misc": 0.0},
}


def make_synth(root: Path) -> tuple[Path, dict[str, str]]:
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for record_id, category, (w, h), turns in SYNTH:
        (root / "images" / f"{record_id}.png").write_bytes(png(w, h, (0, 0, 0)))
        messages = []
        for t, (question, reference, _) in enumerate(turns):
            content: Any = [{"type": "image_url", "image_url": {"url": f"images/{record_id}.png"}},
                            {"type": "text", "text": question}] if t == 0 else question
            messages += [{"role": "user", "content": content}, {"role": "assistant", "content": reference}]
        lines.append(json.dumps({"id": record_id, "category": category, "messages": messages}))
    (root / "test.jsonl").write_text("\n".join(lines) + "\n")
    return root, {q: reply for *_, turns in SYNTH for q, _, reply in turns}


BUILDERS: dict[str, Callable[[Path], tuple[Path, dict[str, str]]]] = {
    "chartqa": make_chartqa, "mathvista": make_mathvista, "mmmu": make_mmmu, "docvqa": make_docvqa,
    "vqav2": make_vqav2, "mm_mt_bench": make_mm_mt_bench, "synth": make_synth,
}
EXPECTED = {"chartqa": CHARTQA_EXPECTED, "mathvista": MATHVISTA_EXPECTED, "mmmu": MMMU_EXPECTED,
            "docvqa": DOCVQA_EXPECTED, "vqav2": VQAV2_EXPECTED, "mm_mt_bench": MM_MT_BENCH_EXPECTED}


# ------------------------------------------------------------------------ scripted endpoint


def last_user_text(body: dict[str, Any]) -> str:
    """The text of the last user message, without the Explicit prompt appended after it."""
    content = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
    text = content if isinstance(content, str) else "".join(p.get("text", "") for p in content if p["type"] == "text")
    for prompt in (prompts.COT_PROMPT, prompts.CHARTQA_PROMPT, prompts.DOCVQA_PROMPT, prompts.VQAV2_PROMPT):
        text = text.replace("\n" + prompt, "").replace(prompt, "")
    return text.strip()


def image_parts(body: dict[str, Any]) -> list[bytes]:
    parts = []
    for message in body["messages"]:
        if isinstance(message["content"], list):
            for part in message["content"]:
                if part["type"] == "image_url":
                    header, _, payload = part["image_url"]["url"].partition(",")
                    assert header.startswith("data:image/") and header.endswith(";base64"), header
                    parts.append(base64.b64decode(payload))
    return parts


def answer_by_question(replies: dict[str, str], default: str = "no idea") -> Callable[[dict[str, Any]], str]:
    """A reply function: the reply whose key occurs in the last user text (longest key wins)."""
    def reply(body: dict[str, Any]) -> str:
        text = last_user_text(body)
        keys = sorted((k for k in replies if k in text), key=len, reverse=True)
        return replies[keys[0]] if keys else default

    return reply


def completion(model: str, text: str) -> dict[str, Any]:
    return {"id": "cmpl-test", "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def completion_with_logprobs(model: str, text: str, top: list[tuple[str, float]]) -> dict[str, Any]:
    """A chat completion whose first token has these top logprobs (OpenAI's layout)."""
    body = completion(model, text)
    first = top[0] if top else (text[:1], 0.0)
    body["choices"][0]["logprobs"] = {"content": [{
        "token": first[0], "logprob": first[1], "bytes": list(first[0].encode()),
        "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top]}]}
    return body


class Fail:
    """A scripted failure: an HTTP status, or a delay longer than the client's timeout."""

    def __init__(self, status: int = 500, delay: float = 0.0, text: str = "late", message: str = "scripted failure"):
        self.status, self.delay, self.text, self.message = status, delay, text, message


class ScriptedServer:
    """An OpenAI-compatible endpoint whose replies come from `self.reply(body) -> str | Fail`.

    Every chat request body is logged in `self.requests`; `stop_after` shuts the server down once
    that many chat requests have been answered (to simulate an endpoint that dies mid-run).
    """

    def __init__(self, reply: Callable[[dict[str, Any]], Any], models=("test-model",), stop_after: int | None = None):
        self.reply = reply
        self.models = list(models)
        self.stop_after = stop_after
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        app = FastAPI()

        @app.get("/v1/models")
        async def list_models():
            return {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "test"}
                                               for m in self.models]}

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            with self.lock:
                self.requests.append(body)
                count = len(self.requests)
            outcome = self.reply(body)
            if isinstance(outcome, Fail):
                if outcome.delay:
                    await asyncio.sleep(outcome.delay)
                    return completion(body["model"], outcome.text)
                return JSONResponse({"error": {"message": outcome.message, "type": "server_error"}},
                                    status_code=outcome.status)
            if self.stop_after is not None and count >= self.stop_after:
                self.server.should_exit = True
            if isinstance(outcome, dict):  # a whole response body (logprobs, ...)
                return outcome
            if isinstance(outcome, bytes):  # raw JSON bytes, e.g. with escapes a dict cannot carry
                return Response(outcome, media_type="application/json")
            return completion(body["model"], outcome)

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> ScriptedServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("scripted server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()

    def questions(self, model: str | None = None) -> list[str]:
        return [last_user_text(b) for b in self.requests if model is None or b["model"] == model]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
