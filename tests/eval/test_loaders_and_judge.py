"""Dataset formats, message assembly and the judge transcript, without HTTP."""

import json

import pyarrow as pa
import pytest
from evalkit import BUILDERS, IMAGE_TYPE, image_cell, png, write_parquet

from pixtral.eval import loaders, prompts
from pixtral.eval.data import loggable_messages, to_openai_messages
from pixtral.eval.errors import DataError
from pixtral.eval.judge import build_judge_messages, parse_rating




def test_mathvista_gold_is_the_choice_letter(tmp_path):
    data, _ = BUILDERS["mathvista"](tmp_path)
    items = list(loaders.load("mathvista", data).items())
    assert [i.reference for i in items] == [["B"], ["1.5"], ["10"], ["A"]]
    assert items[0].id == "1"
    text = items[0].messages[0]["content"][1]["text"]
    assert text == "Hint: answer the question.\nQuestion: Which count?\n" + prompts.MATHVISTA_PROMPT


def test_mmmu_gold_lists_and_split_selection(tmp_path):
    data, _ = BUILDERS["mmmu"](tmp_path)
    dataset = loaders.load("mmmu", data)
    assert [f.name for f in dataset.files] == ["validation-00000-of-00001.parquet"]
    items = list(dataset.items())
    assert [i.reference for i in items] == [["C"], ["7", "seven"], ["blue"]]
    assert items[0].meta["category"] == "Art"


def test_limit_and_hash_independent_of_limit(tmp_path):
    data, _ = BUILDERS["synth"](tmp_path)
    full, part = loaders.load("synth", data), loaders.load("synth", data, limit=2)
    assert part.records == 2 and part.total == 3  # s2 has two turns
    assert full.sha256 == part.sha256
    chart, _ = BUILDERS["chartqa"](tmp_path / "c")
    assert loaders.load("chartqa", chart, limit=4).total == 4


def test_save_to_disk_arrow_folder(tmp_path):
    table = pa.table({"question": ["q1", "q2"], "answer": ["1", "2"],
                      "image": pa.array([image_cell(8, 8), image_cell(9, 9)], type=IMAGE_TYPE)})
    (tmp_path / "test").mkdir()
    with pa.ipc.new_stream(tmp_path / "test" / "data-00000-of-00001.arrow", table.schema) as writer:
        writer.write_table(table)
    dataset = loaders.load("chartqa", tmp_path)
    assert dataset.total == 2
    assert [i.reference for i in dataset.items()] == [["1"], ["2"]]


def test_vqav2_answers_are_the_answer_strings(tmp_path):
    data, _ = BUILDERS["vqav2"](tmp_path)
    item = next(loaders.load("vqav2", data).items())
    assert item.reference == ["yes"] * 10 and item.id == "1000"


def test_mm_mt_bench_turns_and_early_format(tmp_path):
    conversation = {"messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q1"}]},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2"},
    ]}
    write_parquet(tmp_path / "eval.parquet", {"image": [image_cell(5, 6)], "conversation": [json.dumps(conversation)],
                                              "category": ["tables"]}, {"image": IMAGE_TYPE})
    items = list(loaders.load("mm_mt_bench", tmp_path / "eval.parquet").items())
    assert [i.id for i in items] == ["0:0", "0:1"]
    assert [i.reference for i in items] == ["A1", "A2"]
    assert items[1].meta == {"category": "tables", "conversation": 0, "turn": 1, "question": "Q2"}
    wire = to_openai_messages(items[1].messages)
    assert [m["role"] for m in wire] == ["user", "assistant", "user"]
    assert wire[0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert wire[1]["content"] == "A1" and wire[2]["content"] == "Q2"
    logged = loggable_messages(items[1].messages)[0]["content"][0]
    assert logged["image"]["width"] == 5 and logged["image"]["height"] == 6 and "sha256" in logged["image"]


def test_mm_mt_bench_rejects_missing_image_placeholder(tmp_path):
    conversation = [{"role": "user", "content": [{"type": "text", "text": "Q"}]}, {"role": "assistant", "content": "A"}]
    write_parquet(tmp_path / "eval.parquet", {"image": [image_cell(5, 6)], "conversation": [json.dumps(conversation)],
                                              "category": ["x"]}, {"image": IMAGE_TYPE})
    with pytest.raises(DataError, match="eval.parquet row 0 field 'conversation': the first user message"):
        loaders.load("mm_mt_bench", tmp_path)


def test_blank_images_keep_size(tmp_path):
    data, _ = BUILDERS["synth"](tmp_path)
    item = next(loaders.load("synth", data, blank_images=True).items())
    image = item.messages[0]["content"][0]["image"]
    assert image.size == (40, 40)
    from io import BytesIO

    from PIL import Image

    assert Image.open(BytesIO(image.data)).convert("RGB").getextrema() == ((255, 255),) * 3


def test_synth_missing_image_names_the_line(tmp_path):
    record = {"id": "x", "category": "misc", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "images/none.png"}},
                                     {"type": "text", "text": "q"}]},
        {"role": "assistant", "content": "a"}]}
    (tmp_path / "test.jsonl").write_text(json.dumps(record) + "\n")
    from pixtral.errors import PixtralError

    with pytest.raises(PixtralError, match="test.jsonl line 1.*images/none.png"):
        loaders.load("synth", tmp_path)


def test_unusual_image_formats_are_reencoded(tmp_path):
    from io import BytesIO

    from PIL import Image

    buf = BytesIO()
    Image.new("RGB", (7, 3)).save(buf, format="BMP")
    write_parquet(tmp_path / "test.parquet", {"question": ["q"], "answer": ["a"],
                                              "image": [{"bytes": buf.getvalue(), "path": None}]},
                  {"image": IMAGE_TYPE})
    item = next(loaders.load("chartqa", tmp_path / "test.parquet").items())
    image = item.messages[0]["content"][0]["image"]
    assert image.mime == "image/png" and image.size == (7, 3)
    assert png(2, 2)[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------------------- judge


def test_parse_rating():
    assert parse_rating("Rating: [[5]]") == 5.0
    assert parse_rating("[[7.5]] then [[2]]") == 7.5  # the first match
    assert parse_rating("Rating: [[10]]") == 10.0
    assert parse_rating("Rating: 5") is None
    assert parse_rating("[[0]]") is None and parse_rating("[[11]]") is None
    assert parse_rating("") is None


def test_judge_system_prompt_is_verbatim():
    assert prompts.JUDGE_SYSTEM_PROMPT.startswith("Please act as an impartial judge")
    assert prompts.JUDGE_SYSTEM_PROMPT.endswith('for example: "Rating: [[5]]".\n\n')
    assert "correctness and helpfulness" in prompts.JUDGE_SYSTEM_PROMPT


def test_judge_transcript_with_and_without_image(tmp_path):
    data, _ = BUILDERS["mm_mt_bench"](tmp_path)
    second = [i for i in loaders.load("mm_mt_bench", data).items() if i.id == "1:1"][0]
    messages = build_judge_messages(second.judge_turns, "It is 2.5.")
    parts = messages[1]["content"]
    assert [p["type"] for p in parts] == ["text", "image", "text"]
    assert parts[0]["text"] == "<|The Start of Conversation with User|>\n\n### User:\n"
    assert parts[2]["text"].endswith("### Assistant's answer:\nIt is 2.5.\n\n<|The End of Conversation with User|>\n\n\n")
    text_only = build_judge_messages(second.judge_turns, "It is 2.5.", include_image=False)[1]["content"]
    assert len(text_only) == 1 and "### User:\nSum the first column.\n\n### Reference answer:\nThe sum is 10." in text_only[0]["text"]


def test_a_corrupt_image_names_its_row(tmp_path, run_cli):
    write_parquet(tmp_path / "test.parquet", {"question": ["q"], "answer": ["a"],
                                              "image": [{"bytes": b"\x89PNG\r\n\x1a\n" + b"junk", "path": None}]},
                  {"image": IMAGE_TYPE})
    from evalkit import ScriptedServer

    with ScriptedServer(lambda body: "x") as server:
        code, _, err = run_cli("chartqa", "--data", str(tmp_path / "test.parquet"), "--endpoint", server.url,
                               "--served-model", "test-model", "--output-dir", str(tmp_path / "out"), "--no-progress")
    assert code == 1 and "test.parquet row 0 field 'image'" in err and "not readable" in err


def test_split_detection_in_hf_cache_and_parquet_export_layouts(tmp_path):
    from pixtral.eval.data import resolve_table_files

    for name in ["vq_av2-train-00000-of-00002.arrow", "vq_av2-validation-00000-of-00001.arrow", "cache-abc.arrow"]:
        (tmp_path / "cache" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "cache" / name).write_bytes(b"")
    assert [p.name for p in resolve_table_files(tmp_path / "cache", "validation")] == [
        "vq_av2-validation-00000-of-00001.arrow"]
    for split in ("train", "validation"):
        (tmp_path / "export" / "default" / split).mkdir(parents=True)
        (tmp_path / "export" / "default" / split / "0000.parquet").write_bytes(b"")
    assert [p.parent.name for p in resolve_table_files(tmp_path / "export", "validation")] == ["validation"]
