"""Every task end to end over real HTTP against a scripted endpoint with known answers."""

import io
import json

import pytest
from evalkit import (BUILDERS, CHARTQA, EXPECTED, JUDGE_REPLIES, SYNTH, SYNTH_EXPECTED, ScriptedServer,
                     answer_by_question, image_parts, last_user_text)
from PIL import Image

from pixtral.eval import prompts

JUDGE = prompts.JUDGE_MODEL


def read_result(out_dir, task):
    result = json.loads((out_dir / f"{task}.json").read_text())
    items = [json.loads(line) for line in (out_dir / f"{task}.items.jsonl").read_text().splitlines()]
    return result, items


def assert_close(actual, expected):
    if isinstance(expected, dict):
        for key, value in expected.items():
            assert key in actual, key
            assert_close(actual[key], value)
    else:
        assert actual == pytest.approx(expected), (actual, expected)


@pytest.mark.parametrize("task", ["chartqa", "mathvista", "mmmu", "docvqa", "vqav2"])
def test_task_scores_match_the_scripted_answers(task, tmp_path, run_cli):
    data, replies = BUILDERS[task](tmp_path / "data")
    out = tmp_path / "out"
    with ScriptedServer(answer_by_question(replies)) as server:
        code, stdout, err = run_cli(task, "--data", str(data), "--endpoint", server.url, "--served-model", "test-model",
                                  "--output-dir", str(out), "--concurrency", "3", "--no-progress")
    assert code == 0, err
    result, items = read_result(out, task)
    assert_close(result, EXPECTED[task])
    assert result["counts"]["items"] == len(items) == len(server.requests)
    assert result["counts"]["failed"] == 0
    assert len(result["data"]["sha256"]) == 64
    # Protocol: greedy, the task's max_tokens, one user message, the image(s) first.
    for body in server.requests:
        assert body["temperature"] == 0.0
        assert body["max_tokens"] == prompts.MAX_TOKENS[task]
        assert body["model"] == "test-model"
        assert [m["role"] for m in body["messages"]] == ["user"]
        assert image_parts(body)
        content = body["messages"][0]["content"]
        if task != "mmmu":
            assert [p["type"] for p in content] == ["image_url", "text"]
    for row in items:
        assert row["status"] == "ok" and row["answer"] and "scores" in row and "request" in row
        assert row["request"]["messages"][0]["content"][0]["type"] in ("image", "text")
    # Summary table and chart.
    summary = (out / f"{task}.md").read_text()
    assert "| Metric | Value |" in summary and "mistral-evals" in summary
    assert Image.open(out / f"{task}.png").format == "PNG"
    assert "| Metric | Value |" in stdout


def test_explicit_prompt_text_and_layout(tmp_path, run_cli):
    data, replies = BUILDERS["chartqa"](tmp_path / "data")
    with ScriptedServer(answer_by_question(replies)) as server:
        code, _, err = run_cli("chartqa", "--data", str(data), "--endpoint", server.url, "--served-model", "test-model",
                             "--output-dir", str(tmp_path / "out"), "--limit", "1", "--no-progress")
    assert code == 0, err
    text = server.requests[0]["messages"][0]["content"][1]["text"]
    assert text == CHARTQA[0][0] + "\n" + prompts.CHARTQA_PROMPT
    assert "should should be" in text


def test_mmmu_interleaves_images_at_their_placeholders(tmp_path, run_cli):
    data, replies = BUILDERS["mmmu"](tmp_path / "data")
    with ScriptedServer(answer_by_question(replies)) as server:
        code, _, err = run_cli("mmmu", "--data", str(data), "--endpoint", server.url, "--served-model", "test-model",
                             "--output-dir", str(tmp_path / "out"), "--concurrency", "1", "--no-progress")
    assert code == 0, err
    layouts = {last_user_text(b).split("?")[0][:12]: b["messages"][0]["content"] for b in server.requests}
    first = layouts["Which shape "]
    assert [p["type"] for p in first] == ["text", "image_url", "text"]
    assert first[0]["text"] == "Which shape is in "
    assert first[2]["text"] == "?\nA. circle\nB. square\nC. triangle\n" + prompts.MMMU_PROMPT
    two = next(c for k, c in layouts.items() if "dots" in "".join(p.get("text", "") for p in c))
    assert [p["type"] for p in two] == ["image_url", "text", "image_url", "text"]
    last = next(c for k, c in layouts.items() if k.startswith("What color"))
    assert [p["type"] for p in last] == ["text", "image_url", "text"]
    assert last[2]["text"] == prompts.MMMU_PROMPT  # the prompt is its own chunk after a final image
    sizes = [Image.open(io.BytesIO(b)).size for b in image_parts({"messages": [{"role": "user", "content": two}]})]
    assert sizes == [(10, 12), (20, 12)]  # image_1 then image_2


def mm_mt_bench_server(judge_seen):
    def reply(body):
        question = last_user_text(body)
        if body["model"] == JUDGE:
            judge_seen.append(body)
            transcript = json.dumps(body["messages"][1]["content"])
            graded = transcript.split("### Assistant's answer:")[1]
            return next(reply for q, reply in JUDGE_REPLIES.items() if f"My answer to: {q}" in graded)
        return f"My answer to: {question}"

    return ScriptedServer(reply, models=("test-model", JUDGE))


def test_mm_mt_bench_teacher_forcing_judge_and_aggregates(tmp_path, run_cli):
    data, _ = BUILDERS["mm_mt_bench"](tmp_path / "data")
    out = tmp_path / "out"
    judge_seen = []
    with mm_mt_bench_server(judge_seen) as server:
        code, _, err = run_cli("mm_mt_bench", "--data", str(data), "--endpoint", server.url, "--served-model",
                             "test-model", "--judge-endpoint", server.url, "--output-dir", str(out),
                             "--judge-attempts", "2", "--no-progress")
    assert code == 0, err
    result, items = read_result(out, "mm_mt_bench")
    assert_close(result, EXPECTED["mm_mt_bench"])
    assert result["counts"]["items"] == 4 and result["counts"]["unrated"] == 1

    model_requests = [b for b in server.requests if b["model"] == "test-model"]
    assert len(model_requests) == 4  # every user turn, once
    for body in model_requests:
        assert body["max_tokens"] == 4096 and body["temperature"] == 0.0
    second_turn = next(b for b in model_requests if last_user_text(b) == "And the mean?")
    assert [m["role"] for m in second_turn["messages"]] == ["user", "assistant", "user"]
    assert second_turn["messages"][1]["content"] == "The sum is 10."  # the reference, not the model's answer
    assert [p["type"] for p in second_turn["messages"][0]["content"]] == ["image_url", "text"]

    # The judge: system prompt verbatim, real questions, references as text, the image, the answer.
    for body in judge_seen:
        assert body["max_tokens"] == 2048 and body["temperature"] == 0.0
        assert body["messages"][0] == {"role": "system", "content": prompts.JUDGE_SYSTEM_PROMPT}
    judged_mean = [b for b in judge_seen if "And the mean?" in json.dumps(b)]
    assert len(judged_mean) == 1
    parts = judged_mean[0]["messages"][1]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url", "text"]
    transcript = parts[0]["text"] + "<image>" + parts[2]["text"]
    assert transcript == (
        "<|The Start of Conversation with User|>\n\n"
        "### User:\n<image>Sum the first column.\n\n### Reference answer:\nThe sum is 10.\n\n"
        "### User:\nAnd the mean?\n\n### Reference answer:\nThe mean is 2.5.\n\n"
        "\n\n### Assistant's answer:\nMy answer to: And the mean?\n\n"
        "<|The End of Conversation with User|>\n\n\n")
    assert "rolecontent" not in transcript and "{'type'" not in transcript
    assert Image.open(io.BytesIO(image_parts(judged_mean[0])[0])).size == (80, 40)  # this conversation's image
    # Unrated turn: asked at most --judge-attempts times, then reported.
    assert sum("Describe the arrow." in json.dumps(b) for b in judge_seen) == 2
    unrated = next(r for r in items if r["meta"]["question"] == "Describe the arrow.")
    assert unrated["status"] == "unrated" and unrated["judge"]["rating"] is None
    rated = next(r for r in items if r["meta"]["question"] == "And the mean?")
    assert rated["judge"]["rating"] == 7.5 and "Good." in rated["judge"]["rationale"]


def test_mm_mt_bench_judge_without_image_and_rejudge_without_requery(tmp_path, run_cli):
    data, _ = BUILDERS["mm_mt_bench"](tmp_path / "data")
    out = tmp_path / "out"
    judge_seen = []
    with mm_mt_bench_server(judge_seen) as server:
        args = ["--data", str(data), "--endpoint", server.url, "--served-model", "test-model", "--judge-endpoint",
                server.url, "--output-dir", str(out), "--judge-attempts", "1", "--no-progress"]
        code, _, err = run_cli("mm_mt_bench", *args, "--no-judge")
        assert code == 0, err
        assert judge_seen == [] and len(server.requests) == 4
        assert json.loads((out / "mm_mt_bench.json").read_text())["metrics"]["unrated_turns"] == 4
        code, _, err = run_cli("mm_mt_bench", *args, "--judge-no-image")
        assert code == 0, err
    assert len([b for b in server.requests if b["model"] == "test-model"]) == 4  # answers reused
    assert len(judge_seen) == 4
    for body in judge_seen:
        assert isinstance(body["messages"][1]["content"], str)  # text only
    result, _ = read_result(out, "mm_mt_bench")
    assert result["metrics"]["micro_average"] == pytest.approx((8 + 6 + 7.5) / 3)
    assert result["settings"]["judge"]["image"] is False


def test_synth_per_category_and_blank_images(tmp_path, run_cli):
    data, replies = BUILDERS["synth"](tmp_path / "data")
    solve = answer_by_question(replies)

    def reply(body):
        pixels = Image.open(io.BytesIO(image_parts(body)[0])).convert("RGB")
        blank = pixels.getextrema() == ((255, 255), (255, 255), (255, 255))
        return "I cannot see anything" if blank else solve(body)

    with ScriptedServer(reply) as server:
        common = ["--data", str(data), "--endpoint", server.url, "--served-model", "test-model", "--no-progress"]
        code, _, err = run_cli("synth", *common, "--output-dir", str(tmp_path / "real"))
        assert code == 0, err
        real_requests = list(server.requests)
        code, _, err = run_cli("synth", *common, "--output-dir", str(tmp_path / "blank"), "--blank-images")
        assert code == 0, err
        blank_requests = server.requests[len(real_requests):]
    result, items = read_result(tmp_path / "real", "synth")
    assert_close(result["metrics"], SYNTH_EXPECTED["metrics"])
    for category, value in SYNTH_EXPECTED["per_category_baseline"].items():
        assert result["metrics"]["per_category"][category]["baseline"] == pytest.approx(value)
    assert result["metrics"]["per_category"]["tables"]["count"] == 2
    assert result["mistral_evals"] == {}
    assert len(items) == sum(len(turns) for *_, turns in SYNTH)
    two_turn = next(b for b in real_requests if last_user_text(b) == "How many rows?")
    assert two_turn["messages"][1] == {"role": "assistant", "content": "Alpha"}  # teacher forcing
    assert all(b["max_tokens"] == prompts.MAX_TOKENS["synth"] for b in real_requests)

    blank, _ = read_result(tmp_path / "blank", "synth")
    assert blank["metrics"]["baseline"] == 0.0 and blank["settings"]["blank_images"] is True
    real_sizes = sorted(Image.open(io.BytesIO(image_parts(b)[0])).size for b in real_requests)
    blank_sizes = sorted(Image.open(io.BytesIO(image_parts(b)[0])).size for b in blank_requests)
    assert real_sizes == blank_sizes


def test_progress_bar_shows_running_scores(tmp_path, run_cli):
    data, replies = BUILDERS["chartqa"](tmp_path / "data")
    with ScriptedServer(answer_by_question(replies)) as server:
        code, _, err = run_cli("chartqa", "--data", str(data), "--endpoint", server.url, "--served-model",
                               "test-model", "--output-dir", str(tmp_path / "out"))
    assert code == 0, err
    assert "6/6" in err and "baseline 33.3%" in err and "L3 83.3%" in err
