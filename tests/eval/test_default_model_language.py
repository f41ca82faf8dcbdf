"""Smoke run of the language tasks on the packaged default model (in-process), whose figures
docs/language_evaluation.md quotes: a model trained only on image questions has no text ability."""

from __future__ import annotations

import json

from language_data import write_humaneval, write_math, write_mmlu, write_mt_bench


def test_default_model_scores_what_a_model_without_text_ability_scores(tmp_path, run_cli):
    data = {"mmlu": write_mmlu(tmp_path), "math": write_math(tmp_path), "humaneval": write_humaneval(tmp_path),
            "mt_bench": write_mt_bench(tmp_path)}
    found = {}
    for task, path in data.items():
        out = tmp_path / task
        code, _, err = run_cli(task, "--data", str(path), "--output-dir", str(out), "--no-progress",
                               *(("--no-judge",) if task == "mt_bench" else ()))
        assert code == 0, err
        found[task] = json.loads((out / f"{task}.json").read_text())
        assert found[task]["counts"]["failed"] == 0, task
    mmlu = found["mmlu"]["metrics"]
    # Chance is 25%. It ends every answer at once: no letter in the text, and no first-token logprobs
    # (an API reports no logprobs for the stop token), so no letter either way.
    assert mmlu["accuracy"] == 0 and mmlu["no_letter"] == 4
    assert mmlu["logprob_accuracy"] == 0 and mmlu["logprob_scored"] == 4
    items = [json.loads(line) for line in (tmp_path / "mmlu" / "mmlu.items.jsonl").read_text().splitlines()]
    assert all(r["answer"] == {"text": "", "top_logprobs": []} for r in items)
    assert found["math"]["metrics"]["maj_at_k"] == 0
    assert found["humaneval"]["metrics"]["pass@1"] == 0
    assert found["mt_bench"]["metrics"]["unjudged_turns"] == 6
