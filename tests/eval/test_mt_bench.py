"""FastChat MT-Bench: loading FastChat's files, judge prompts, rating parsing and the bounded judge."""

import json

import pytest

from pixtral.eval import mt_bench
from pixtral.eval.data import Item
from pixtral.eval.errors import DataError

QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["Write a travel blog post about Hawaii.",
                                                         "Rewrite it starting every sentence with A."]},
    # FastChat's question.jsonl has a `reference` field on some rows; its judging does not read it.
    {"question_id": 111, "category": "math", "turns": ["Area of the triangle (0,0), (-1,1), (3,3)?",
                                                       "Area of the circumscribed circle?"],
     "reference": ["Area is 3", "5pi"]},
    {"question_id": 123, "category": "coding", "turns": ["Write a joke web page.", "Use CSS to make it blue."]},
    {"question_id": 131, "category": "extraction", "turns": ["Rate the reviews 1-5.", "Add the release date."],
     "reference": ["[5, 1, 3]", ""]},
]
REFERENCES = [
    {"question_id": 111, "answer_id": "a", "model_id": "gpt-4",
     "choices": [{"index": 0, "turns": ["The area is 3.", "The area is 5 pi."]}], "tstamp": 1.0},
    {"question_id": 123, "answer_id": "b", "model_id": "gpt-4",
     "choices": [{"index": 0, "turns": ["<html>joke</html>", "<style>body{color:blue}</style>"]}], "tstamp": 2.0},
]


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def bench(tmp_path):
    root = tmp_path / "mt_bench"
    write_jsonl(root / "question.jsonl", QUESTIONS)
    write_jsonl(root / "reference_answer" / "gpt-4.jsonl", REFERENCES)
    return root


def items_by_id(dataset):
    return {item.id: item for item in dataset.items()}


# ------------------------------------------------------------------------------------------ load


def test_load_folder_ids_turns_and_references(bench):
    dataset = mt_bench.load(bench)
    assert dataset.task == "mt_bench" and dataset.total == dataset.records == 4
    assert [f.name for f in dataset.files] == ["question.jsonl", "gpt-4.jsonl"]
    items = items_by_id(dataset)
    assert list(items) == ["81", "111", "123", "131"]
    assert items["81"].messages == [] and items["81"].meta == {"category": "writing"}
    assert items["81"].reference == {"turns": QUESTIONS[0]["turns"], "references": None}
    # references exactly for NEED_REF_CATS, from reference_answer/gpt-4.jsonl (not the row's own field)
    assert items["111"].reference["references"] == ["The area is 3.", "The area is 5 pi."]
    assert items["123"].reference["references"] == REFERENCES[1]["choices"][0]["turns"]
    assert items["131"].reference["references"] is None  # extraction: not in NEED_REF_CATS
    for item in items.values():
        assert (item.reference["references"] is not None) == (item.meta["category"] in mt_bench.NEED_REF_CATS)


def test_row_references_opt_in(bench):
    items = items_by_id(mt_bench.load(bench, row_references=True))
    assert items["111"].reference["references"] == ["Area is 3", "5pi"]
    assert items["123"].reference["references"] == REFERENCES[1]["choices"][0]["turns"]  # no own field
    assert items["131"].reference["references"] is None


def test_load_question_file_limit_and_hash(bench):
    full = mt_bench.load(bench)
    part = mt_bench.load(bench / "question.jsonl", limit=2)
    assert [i.id for i in part.items()] == ["81", "111"] and part.total == 2
    assert part.sha256 == full.sha256
    (bench / "reference_answer" / "gpt-4.jsonl").write_text(json.dumps(REFERENCES[1]) + "\n")
    assert mt_bench.load(bench, limit=1).sha256 != full.sha256  # the reference file is hashed too


def test_no_reference_file_is_fine_without_reference_categories(tmp_path):
    path = write_jsonl(tmp_path / "question.jsonl", [QUESTIONS[0], QUESTIONS[3]])
    dataset = mt_bench.load(path)
    assert dataset.total == 2 and [f.name for f in dataset.files] == ["question.jsonl"]


def test_missing_reference_names_file_and_question(bench):
    (bench / "reference_answer" / "gpt-4.jsonl").write_text(json.dumps(REFERENCES[0]) + "\n")
    with pytest.raises(DataError, match=r"gpt-4\.jsonl: no reference answer for question_id 123"):
        mt_bench.load(bench)
    (bench / "reference_answer" / "gpt-4.jsonl").unlink()
    with pytest.raises(DataError, match=r"gpt-4\.jsonl: no such file.*question_id 111"):
        mt_bench.load(bench)


@pytest.mark.parametrize("line, message", [
    ("{not json", r"question\.jsonl line 2: not valid JSON"),
    ("[1, 2]", r"question\.jsonl line 2: expected a JSON object"),
    ({"category": "writing", "turns": ["q"]}, r"question\.jsonl line 2 field 'question_id': value is missing"),
    ({"question_id": 81, "category": "writing", "turns": ["q"]}, r"question\.jsonl line 2 field 'question_id': "
                                                                  r"duplicate id 81 \(first on line 1\)"),
    ({"question_id": 90, "turns": ["q"]}, r"question\.jsonl line 2 field 'category'"),
    ({"question_id": 90, "category": "writing"}, r"question\.jsonl line 2 field 'turns': value is missing"),
    ({"question_id": 90, "category": "writing", "turns": []}, r"question\.jsonl line 2 field 'turns': expected a "
                                                              r"non-empty list"),
    ({"question_id": 90, "category": "writing", "turns": ["q", " "]}, r"question\.jsonl line 2 field 'turns'\[1\]: "
                                                                      r"empty turn"),
    ({"question_id": 90, "category": "writing", "turns": ["q", 3]}, r"question\.jsonl line 2 field 'turns'\[1\]: "
                                                                    r"expected a string"),
    ({"question_id": 90, "category": "writing", "turns": ["a", "b", "c"]}, r"question\.jsonl line 2 field 'turns': "
                                                                           r"MT-Bench questions have one or two"),
])
def test_question_file_errors_name_file_line_and_field(tmp_path, line, message):
    path = write_jsonl(tmp_path / "question.jsonl", [QUESTIONS[0], line])
    with pytest.raises(DataError, match=message):
        mt_bench.load(path)


@pytest.mark.parametrize("rows, message", [
    ([REFERENCES[0], "oops"], r"gpt-4\.jsonl line 2: not valid JSON"),
    ([REFERENCES[0], REFERENCES[0]], r"gpt-4\.jsonl line 2 field 'question_id': duplicate id 111"),
    ([{"question_id": 111}], r"gpt-4\.jsonl line 1 field 'choices'"),
    ([{"question_id": 111, "choices": [{"index": 0}]}], r"gpt-4\.jsonl line 1 field 'choices\[0\]\.turns': "
                                                         r"value is missing"),
    ([{"question_id": 111, "choices": [{"turns": ["only one"]}]}, REFERENCES[1]],
     r"gpt-4\.jsonl line 1 field 'choices\[0\]\.turns': question_id 111 has 2 turns but 1 reference"),
])
def test_reference_file_errors_name_file_line_and_field(bench, rows, message):
    write_jsonl(bench / "reference_answer" / "gpt-4.jsonl", rows)
    with pytest.raises(DataError, match=message):
        mt_bench.load(bench)


def test_missing_path_and_folder_without_questions(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        mt_bench.load(tmp_path / "absent")
    with pytest.raises(DataError, match="no question.jsonl"):
        mt_bench.load(tmp_path)


# -------------------------------------------------------------------------------------- ratings


@pytest.mark.parametrize("reply, rating", [
    ("Good answer. Rating: [[8]]", 8.0),
    ("Rating: [[7.5]]", 7.5),
    ("Rating: [9]", 9.0),  # FastChat's backup pattern
    ("[[3]] then [[9]]", 3.0),
    ("Rating: [[11]]", None),
    ("Rating: [[0]]", None),
    ("no rating here", None),
    ("", None),
])
def test_parse_rating(reply, rating):
    assert mt_bench.parse_rating(reply) == rating


# ------------------------------------------------------------------------------- judge messages


def item(category, references=None):
    return Item(id="7", messages=[], reference={"turns": ["Q one?", "Q two?"], "references": references},
                meta={"category": category})


def test_turn_one_without_reference_exact_text():
    messages = mt_bench.judge_messages(item("writing"), ["A one.", "A two."], 0)
    assert messages[0] == {"role": "system", "content": "You are a helpful assistant."}
    assert messages[1]["role"] == "user"
    assert messages[1]["content"] == (
        "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided by an AI "
        "assistant to the user question displayed below. Your evaluation should consider factors such as the "
        "helpfulness, relevance, accuracy, depth, creativity, and level of detail of the response. Begin your "
        "evaluation by providing a short explanation. Be as objective as possible. After providing your "
        "explanation, you must rate the response on a scale of 1 to 10 by strictly following this format: "
        "\"[[rating]]\", for example: \"Rating: [[5]]\".\n\n[Question]\nQ one?\n\n[The Start of Assistant's "
        "Answer]\nA one.\n[The End of Assistant's Answer]")


def test_turn_one_with_reference():
    messages = mt_bench.judge_messages(item("math", ["R one.", "R two."]), ["A one.", "A two."], 0)
    assert messages[0]["content"] == mt_bench.SINGLE_MATH_V1_SYSTEM
    user = messages[1]["content"]
    assert user.startswith(mt_bench.SINGLE_MATH_V1_TEMPLATE.split("{question}")[0])
    assert ("[Question]\nQ one?\n\n[The Start of Reference Answer]\nR one.\n[The End of Reference Answer]\n\n"
            "[The Start of Assistant's Answer]\nA one.\n[The End of Assistant's Answer]") in user
    assert "R two." not in user and "A two." not in user


def test_turn_two_without_reference_shows_own_first_answer():
    messages = mt_bench.judge_messages(item("roleplay"), ["A one.", "A two."], 1)
    assert messages[0]["content"] == mt_bench.SINGLE_V1_MULTI_TURN_SYSTEM
    assert messages[0]["content"].endswith("\"Rating: [[5]]\".\n\n")
    assert messages[1]["content"] == (
        "<|The Start of Assistant A's Conversation with User|>\n\n### User:\nQ one?\n\n### Assistant A:\nA one.\n\n"
        "### User:\nQ two?\n\n### Assistant A:\nA two.\n\n<|The End of Assistant A's Conversation with User|>")


def test_turn_two_with_reference():
    messages = mt_bench.judge_messages(item("coding", ["R one.", "R two."]), ["A one.", "A two."], 1)
    assert messages[0]["content"] == mt_bench.SINGLE_MATH_V1_MULTI_TURN_SYSTEM
    assert messages[1]["content"] == (
        "<|The Start of Reference Answer|>\n\n### User:\nQ one?\n\n### Reference answer:\nR one.\n\n"
        "### User:\nQ two?\n\n### Reference answer:\nR two.\n\n<|The End of Reference Answer|>\n\n\n"
        "<|The Start of Assistant A's Conversation with User|>\n\n### User:\nQ one?\n\n### Assistant A:\nA one.\n\n"
        "### User:\nQ two?\n\n### Assistant A:\nA two.\n\n<|The End of Assistant A's Conversation with User|>")


def test_prompt_names_and_braces_in_text():
    assert [mt_bench.prompt_name(item("writing"), t) for t in (0, 1)] == ["single-v1", "single-v1-multi-turn"]
    assert [mt_bench.prompt_name(item("reasoning"), t) for t in (0, 1)] == [
        "single-math-v1", "single-math-v1-multi-turn"]
    messages = mt_bench.judge_messages(item("writing"), ["def f(): return {'a': 1}", "x"], 0)
    assert "def f(): return {'a': 1}" in messages[1]["content"]
    with pytest.raises(ValueError, match="needs a reference"):
        mt_bench.judge_messages(item("math"), ["a", "b"], 0)
    with pytest.raises(ValueError, match="needs 2 answer"):
        mt_bench.judge_messages(item("writing"), ["a"], 1)


# ----------------------------------------------------------------------------------------- judge


class ScriptedJudge:
    identity = {"served_model": "gpt-4"}

    def __init__(self, replies):
        self.replies = list(replies)
        self.calls = []

    def describe(self):
        return {"endpoint": "fake", "model": "gpt-4"}

    def complete(self, messages, *, max_tokens, temperature):
        self.calls.append((messages, max_tokens, temperature))
        return self.replies.pop(0)


def test_judge_rates_each_turn_with_fastchat_settings():
    backend = ScriptedJudge(["fine [[8]]", "weaker [[6.5]]"])
    judge = mt_bench.MTBenchJudge(backend)
    result = judge.rate(item("writing"), ["My first answer.", "My second answer."])
    assert result.ratings == [8.0, 6.5] and result.attempts == [1, 1] and result.rated
    assert result.row() == {"ratings": [8.0, 6.5], "rationales": ["fine [[8]]", "weaker [[6.5]]"], "attempts": [1, 1]}
    assert json.loads(json.dumps(result.row())) == result.row()
    assert all(c[1:] == (2048, 0.0) for c in backend.calls)
    turn_two = backend.calls[1][0][1]["content"]
    assert "### Assistant A:\nMy first answer.\n\n### User:\nQ two?\n\n### Assistant A:\nMy second answer." in turn_two
    assert judge.identity == {"served_model": "gpt-4", "protocol": "fastchat-single-v1"}
    assert judge.describe()["rating_attempts"] == 3 and judge.describe()["max_tokens"] == 2048


def test_judge_without_rating_stops_after_attempts():
    backend = ScriptedJudge(["no score"] * 3 + ["[[9]]"])
    result = mt_bench.MTBenchJudge(backend, attempts=3).rate(item("writing"), ["a", "b"])
    assert result.ratings == [None, 9.0] and result.attempts == [3, 1] and not result.rated
    assert result.rationales[0] == "no score" and len(backend.calls) == 4


def test_judge_rates_on_second_try():
    backend = ScriptedJudge(["hmm", "ok [[7]]", "[[5]]"])
    result = mt_bench.MTBenchJudge(backend).rate(item("math", ["r1", "r2"]), ["a", "b"])
    assert result.ratings == [7.0, 5.0] and result.attempts == [2, 1]
    assert backend.calls[0][0] == backend.calls[1][0]  # the same request asked again
    assert "### Reference answer:\nr2" in backend.calls[2][0][1]["content"]


def test_judge_request_failure_propagates():
    from pixtral.eval.backends import RequestFailed

    class Failing(ScriptedJudge):
        def complete(self, messages, *, max_tokens, temperature):
            raise RequestFailed("judge down")

    with pytest.raises(RequestFailed):
        mt_bench.MTBenchJudge(Failing([])).rate(item("writing"), ["a", "b"])


def test_answer_temperatures():
    assert mt_bench.answer_temperature("writing") == 0.7 and mt_bench.answer_temperature("math") == 0.0
    assert mt_bench.answer_temperature("stem") == 0.1 and mt_bench.answer_temperature("other") == 0.7
    assert mt_bench.MAX_TOKENS == 1024 and mt_bench.DEFAULT_JUDGE_MODEL == "gpt-4"
