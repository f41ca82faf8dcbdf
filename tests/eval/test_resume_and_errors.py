"""Resume without re-querying, bounded retries, failed items, unreachable endpoints, bad input."""

import json

import pytest
from evalkit import BUILDERS, CHARTQA, EXPECTED, Fail, ScriptedServer, answer_by_question, free_port, last_user_text

QUESTIONS = [q for q, *_ in CHARTQA]


def chartqa(tmp_path):
    data, replies = BUILDERS["chartqa"](tmp_path / "data")
    return data, answer_by_question(replies)


def args(data, server_url, out, *extra):
    return ("chartqa", "--data", str(data), "--endpoint", server_url, "--served-model", "test-model",
            "--output-dir", str(out), "--no-progress", *extra)


def items(out, task="chartqa"):
    rows = {}
    for line in (out / f"{task}.items.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["id"]] = row
    return rows


def test_resume_after_limit_queries_only_the_rest(tmp_path, run_cli):
    data, reply = chartqa(tmp_path)
    out = tmp_path / "out"
    with ScriptedServer(reply) as server:
        code, _, err = run_cli(*args(data, server.url, out, "--limit", "2"))
        assert code == 0, err
        assert sorted(server.questions()) == sorted(QUESTIONS[:2])
        first = json.loads((out / "chartqa.json").read_text())
        assert first["counts"]["items"] == 2 and first["settings"]["limit"] == 2
        server.requests.clear()
        code, _, err = run_cli(*args(data, server.url, out))
        assert code == 0, err
    assert sorted(server.questions()) == sorted(QUESTIONS[2:])  # nothing finished is asked again
    result = json.loads((out / "chartqa.json").read_text())
    assert result["counts"]["resumed"] == 2 and result["counts"]["queried"] == 4
    assert result["metrics"]["baseline"] == pytest.approx(EXPECTED["chartqa"]["metrics"]["baseline"])


def test_resume_after_the_endpoint_dies_mid_run(tmp_path, run_cli):
    data, reply = chartqa(tmp_path)
    out = tmp_path / "out"
    with ScriptedServer(reply, stop_after=3) as dying:
        code, _, err = run_cli(*args(data, dying.url, out, "--concurrency", "1", "--retries", "2"))
    assert code == 1
    assert "cannot reach the model endpoint" in err and "run the same command again to resume" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (out / "chartqa.json").exists()
    finished = {row["id"] for row in items(out).values() if row["status"] == "ok"}
    assert len(finished) >= 3
    finished_questions = {QUESTIONS[int(i)] for i in finished}

    with ScriptedServer(reply) as server:  # the server comes back (on another port)
        code, _, err = run_cli(*args(data, server.url, out, "--concurrency", "2"))
    assert code == 0, err
    asked_again = set(server.questions())
    assert asked_again.isdisjoint(finished_questions)
    assert asked_again | finished_questions == set(QUESTIONS)
    result = json.loads((out / "chartqa.json").read_text())
    assert result["counts"]["items"] == len(QUESTIONS) and result["counts"]["failed"] == 0
    assert result["metrics"]["flexible_level_3"] == pytest.approx(5 / 6)


def test_transient_5xx_is_retried(tmp_path, run_cli):
    data, reply = chartqa(tmp_path)
    failures = {QUESTIONS[1]: 2}  # two 503s, then an answer

    def flaky(body):
        question = last_user_text(body)
        if failures.get(question, 0) > 0:
            failures[question] -= 1
            return Fail(503)
        return reply(body)

    with ScriptedServer(flaky) as server:
        code, _, err = run_cli(*args(data, server.url, tmp_path / "out", "--retries", "3"))
    assert code == 0, err
    assert server.questions().count(QUESTIONS[1]) == 3
    result = json.loads((tmp_path / "out" / "chartqa.json").read_text())
    assert result["counts"]["failed"] == 0
    assert result["metrics"]["baseline"] == pytest.approx(2 / 6)


def test_persistent_errors_fail_the_item_not_the_run_and_a_rerun_retries_it(tmp_path, run_cli):
    data, reply = chartqa(tmp_path)
    out = tmp_path / "out"
    broken = {QUESTIONS[0]: Fail(500), QUESTIONS[4]: Fail(400)}

    with ScriptedServer(lambda body: broken.get(last_user_text(body)) or reply(body)) as server:
        code, stdout, err = run_cli(*args(data, server.url, out, "--retries", "2"))
        assert code == 0, err
        assert server.questions().count(QUESTIONS[0]) == 2  # bounded retries on 5xx
        assert server.questions().count(QUESTIONS[4]) == 1  # 4xx is not retried
        rows = items(out)
        assert rows["0"]["status"] == "failed" and "500" in rows["0"]["error"] and rows["0"]["answer"] is None
        assert rows["4"]["status"] == "failed" and "400" in rows["4"]["error"]
        result = json.loads((out / "chartqa.json").read_text())
        assert result["counts"]["failed"] == 2 and result["counts"]["failed_items"] == ["0", "4"]
        assert result["metrics"]["baseline"] == pytest.approx(1 / 6)  # failed items count as wrong
        assert "2 item(s) failed" in stdout

        broken.clear()
        server.requests.clear()
        code, _, err = run_cli(*args(data, server.url, out))
        assert code == 0, err
        assert sorted(server.questions()) == sorted([QUESTIONS[0], QUESTIONS[4]])
    assert json.loads((out / "chartqa.json").read_text())["metrics"]["baseline"] == pytest.approx(2 / 6)


def test_timeouts_are_retried_then_recorded(tmp_path, run_cli):
    data, reply = chartqa(tmp_path)
    slow = QUESTIONS[2]
    with ScriptedServer(lambda body: Fail(delay=2.0) if last_user_text(body) == slow else reply(body)) as server:
        code, _, err = run_cli(*args(data, server.url, tmp_path / "out", "--timeout", "0.3", "--retries", "2"))
        assert code == 0, err
        assert server.questions().count(slow) == 2
    row = items(tmp_path / "out")["2"]
    assert row["status"] == "failed" and "Timeout" in row["error"]


def test_unreachable_endpoint_exits_nonzero_with_one_line(tmp_path, run_cli):
    data, _ = chartqa(tmp_path)
    url = f"http://127.0.0.1:{free_port()}/v1"
    code, _, err = run_cli(*args(data, url, tmp_path / "out"))
    assert code == 1
    assert err.startswith("error: cannot reach the model endpoint http://127.0.0.1:") and "Traceback" not in err


def test_unreachable_judge_exits_nonzero(tmp_path, run_cli):
    data, _ = BUILDERS["mm_mt_bench"](tmp_path / "data")
    with ScriptedServer(lambda body: "an answer") as server:
        code, _, err = run_cli("mm_mt_bench", "--data", str(data), "--endpoint", server.url, "--served-model",
                               "test-model", "--judge-endpoint", f"http://127.0.0.1:{free_port()}",
                               "--output-dir", str(tmp_path / "out"), "--no-progress")
    assert code == 1 and "cannot reach the judge endpoint" in err


def test_changed_settings_refuse_to_resume_unless_overwrite(tmp_path, run_cli):
    data, replies = BUILDERS["synth"](tmp_path / "data")
    out = tmp_path / "out"
    with ScriptedServer(answer_by_question(replies)) as server:
        common = ["synth", "--data", str(data), "--endpoint", server.url, "--served-model", "test-model",
                  "--output-dir", str(out), "--no-progress"]
        code, _, err = run_cli(*common)
        assert code == 0, err
        code, _, err = run_cli(*common, "--blank-images")
        assert code == 1 and "synth.items.jsonl" in err and "blank_images" in err and "--overwrite" in err
        code, _, err = run_cli(*common, "--blank-images", "--overwrite")
        assert code == 0, err
    assert json.loads((out / "synth.json").read_text())["settings"]["blank_images"] is True


def test_a_truncated_last_line_is_requeried(tmp_path, run_cli):
    data, reply = chartqa(tmp_path)
    out = tmp_path / "out"
    with ScriptedServer(reply) as server:
        code, _, err = run_cli(*args(data, server.url, out))
        assert code == 0, err
        path = out / "chartqa.items.jsonl"
        lines = path.read_text().splitlines()
        last_id = json.loads(lines[-1])["id"]
        path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])  # a crash mid-write
        server.requests.clear()
        code, _, err = run_cli(*args(data, server.url, out))
        assert code == 0, err
        assert server.questions() == [QUESTIONS[int(last_id)]]
    result = json.loads((out / "chartqa.json").read_text())
    assert result["counts"]["items"] == 6 and "unreadable" in result["run"]["warnings"][0]


@pytest.mark.parametrize("argv,message", [
    (["--endpoint", "http://x:1/v1"], "--endpoint needs --served-model"),
    (["--served-model", "m"], "--served-model needs --endpoint"),
    (["--endpoint", "ftp://x", "--served-model", "m"], "--endpoint must be an http(s) URL"),
    (["--endpoint", "http://x:1", "--served-model", "m", "--model", "ckpt"], "exclusive"),
    (["--endpoint", "http://x:1/v1", "--served-model", "m", "--quantization", "int8"],
     "--quantization is for a local --model"),
])
def test_option_errors(tmp_path, run_cli, argv, message):
    data, _ = chartqa(tmp_path)
    code, _, err = run_cli("chartqa", "--data", str(data), *argv)
    assert code == 1 and message in err


def test_mm_mt_bench_without_a_judge_says_how_to_get_one(tmp_path, run_cli, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    code, _, err = run_cli("mm_mt_bench", "--data", str(tmp_path), "--endpoint", "http://x:1", "--served-model", "m")
    assert code == 1 and "OPENAI_API_KEY" in err and "--judge-endpoint" in err


def test_data_errors_name_the_file_and_field(tmp_path, run_cli):
    code, _, err = run_cli(*args(tmp_path / "missing", "http://127.0.0.1:1/v1", tmp_path / "out"))
    assert code == 1 and "missing: no such file or directory" in err
    from evalkit import write_parquet

    write_parquet(tmp_path / "bad" / "test-00000-of-00001.parquet", {"question": ["q"], "answer": ["a"]})
    code, _, err = run_cli(*args(tmp_path / "bad", "http://127.0.0.1:1/v1", tmp_path / "out"))
    assert code == 1 and "test-00000-of-00001.parquet: missing column(s) image" in err
    write_parquet(tmp_path / "wrong" / "train-00000-of-00001.parquet", {"question": ["q"]})
    code, _, err = run_cli(*args(tmp_path / "wrong", "http://127.0.0.1:1/v1", tmp_path / "out"))
    assert code == 1 and "no files for split 'test' (found splits: train)" in err
    (tmp_path / "synth").mkdir()
    (tmp_path / "synth" / "test.jsonl").write_text('{"id": "a", "category": "misc"}\n')
    code, _, err = run_cli("synth", "--data", str(tmp_path / "synth"), "--endpoint", "http://127.0.0.1:1",
                           "--served-model", "m", "--output-dir", str(tmp_path / "out"))
    assert code == 1 and "test.jsonl line 1: missing field(s) messages" in err


def test_judge_dying_keeps_model_answers_and_resume_only_rejudges(tmp_path, run_cli):
    from pixtral.eval.prompts import JUDGE_MODEL

    data, _ = BUILDERS["mm_mt_bench"](tmp_path / "data")
    out = tmp_path / "out"
    with ScriptedServer(lambda body: "an answer") as model:
        with ScriptedServer(lambda body: "Rating: [[6]]", models=(JUDGE_MODEL,), stop_after=2) as judge:
            code, _, err = run_cli("mm_mt_bench", "--data", str(data), "--endpoint", model.url, "--served-model",
                                   "test-model", "--judge-endpoint", judge.url, "--output-dir", str(out),
                                   "--concurrency", "1", "--retries", "1", "--no-progress")
        assert code == 1 and "cannot reach the judge endpoint" in err
        first = items(out, "mm_mt_bench")
        answered = {i for i, row in first.items() if row.get("answer")}
        assert len(answered) >= 3 and sum(r["status"] == "ok" for r in first.values()) >= 2
        model.requests.clear()
        with ScriptedServer(lambda body: "Rating: [[6]]", models=(JUDGE_MODEL,)) as judge:
            code, _, err = run_cli("mm_mt_bench", "--data", str(data), "--endpoint", model.url, "--served-model",
                                   "test-model", "--judge-endpoint", judge.url, "--output-dir", str(out),
                                   "--no-progress")
        assert code == 0, err
        assert len(model.requests) == 4 - len(answered)  # only unanswered turns go to the model again
        assert len(judge.requests) == 4 - sum(r["status"] == "ok" for r in first.values())
    result = json.loads((out / "mm_mt_bench.json").read_text())
    assert result["metrics"]["micro_average"] == 6.0 and result["metrics"]["unrated_turns"] == 0
