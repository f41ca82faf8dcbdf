"""Evaluation harness: MM-MT-Bench and the five academic benchmarks with the Pixtral paper's
protocol, plus the released `mistral-evals` scoring for comparison, and the paper's language table,
against any model backend.

Modules, one job each:
  prompts        the Explicit prompts, decoding settings and judge prompt (verbatim protocol text)
  data, images   items, dataset files, hashing, images as base64 data URIs
  loaders        one loader per task: local dataset -> items (requests + references)
  parsing        answer extraction at the paper's parsing levels
  metrics        paper-protocol metrics (levels, relaxed match, ANLS tau=0.5, VQA accuracy, synth)
  mistral_evals  the released harness's metrics, reproduced exactly
  judge          the MM-MT-Bench judge (transcript, [[n]] ratings, bounded retries)
  backends       OpenAI-compatible endpoint or in-process engine
  tasks          per-task scoring and aggregation (metric names of TASK.json)
  runner         concurrency, resume, progress bar, output files
  report         markdown summary and PNG chart
  language_tasks the paper's Table 3: MT-Bench, MMLU, MATH, HumanEval (docs/language_evaluation.md),
                 with mt_bench, mmlu, math_data, math_answers, humaneval and sandbox

Typical use from Python (the CLI is `pixtral eval`):

    from pixtral.eval import OpenAIBackend, RunConfig, evaluate
    result = evaluate(RunConfig("chartqa", "data/ChartQA", "runs/eval"),
                      OpenAIBackend("http://localhost:8000/v1", "pixtral"))
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "evaluate": "runner", "RunConfig": "runner", "output_paths": "runner",
    "OpenAIBackend": "backends", "LocalBackend": "backends", "RequestFailed": "backends",
    "Judge": "judge", "load": "loaders", "TASKS": "tasks", "TASK_NAMES": "tasks",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"pixtral.eval.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'pixtral.eval' has no attribute '{name}'")
