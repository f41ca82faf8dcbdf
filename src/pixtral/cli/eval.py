"""`pixtral eval TASK`: evaluate a model on MM-MT-Bench, MMMU, MathVista, ChartQA, DocVQA, VQAv2 or synth,
or on the paper's language table: MT-Bench, MMLU, MATH, HumanEval.

Examples:
  pixtral eval chartqa --data ~/data/ChartQA --endpoint http://localhost:8000/v1 --served-model pixtral
  pixtral eval mm_mt_bench --data ~/data/MM-MT-Bench --model ./checkpoints/pixtral-12b \\
      --judge-endpoint https://api.openai.com/v1        # judge key from OPENAI_API_KEY
  pixtral eval synth --data out/synth --blank-images --output-dir runs/eval-blank
  pixtral eval mt_bench --data FastChat/fastchat/llm_judge/data/mt_bench --model ./checkpoints/pixtral-12b
  pixtral eval mmlu --data ~/data/mmlu/data --model ./checkpoints/pixtral-12b
  pixtral eval math --data ~/data/MATH --samples 4 --model ./checkpoints/pixtral-12b     # maj@4
  pixtral eval humaneval --data ~/data/HumanEval.jsonl.gz --samples 10 --model ./checkpoints/pixtral-12b
"""

from __future__ import annotations

import argparse
import math
import os

from pixtral.eval.tasks import TASK_NAMES

DATA_HELP = (
    "local copy of the dataset in its public format: a parquet/arrow file or a Hugging Face dataset folder "
    "(mm_mt_bench: mistralai/MM-MT-Bench split eval; mmmu: lmms-lab/MMMU validation; mathvista: "
    "AI4Math/MathVista testmini; chartqa: lmms-lab/ChartQA test; docvqa: lmms-lab/DocVQA config DocVQA "
    "validation; vqav2: HuggingFaceM4/VQAv2 or lmms-lab/VQAv2 validation; synth: the folder written by "
    "`pixtral data synth --out DIR`, or its test.jsonl; mt_bench: FastChat's data/mt_bench folder or its "
    "question.jsonl, with reference_answer/gpt-4.jsonl; mmlu: Hendrycks' data folder (dev/, test/ CSVs) or "
    "cais/mmlu's parquet; math: the MATH folder (test/<subject>/<n>.json) or MATH-500's test.jsonl; "
    "humaneval: HumanEval.jsonl(.gz) or openai_humaneval's parquet)"
)


def _number(cast, low: float, *, strict: bool, what: str):
    """An argparse type: `cast(text)`, required to be > low (strict) or >= low; NaN is refused."""

    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got '{text}'") from None
        if not (value > low if strict else value >= low):
            raise argparse.ArgumentTypeError(f"expected {what}, got '{text}'")
        return value

    return parse


_positive_int = _number(int, 0, strict=True, what="a positive integer")
_positive_float = _number(float, 0, strict=True, what="a positive number")
_temperature = _number(float, 0, strict=False, what="a temperature from 0 to 2")
_non_negative_int = _number(int, 0, strict=False, what="an integer >= 0")
SAMPLING_TASKS = ("math", "humaneval")
JUDGED_TASKS = ("mm_mt_bench", "mt_bench")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a model on a benchmark (paper protocol, resumable)",
        description=(
            "Evaluate a model with the Pixtral paper's protocol (Explicit prompts, greedy decoding, strict and "
            "flexible parsing) plus the released mistral-evals metrics for comparison, or on the paper's "
            "language table with each benchmark's common protocol (docs/language_evaluation.md). Results go to "
            "OUTPUT_DIR/TASK.json, TASK.items.jsonl (per item, written as results arrive; re-running the same "
            "command resumes), TASK.md and TASK.png."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2],
    )
    parser.add_argument("task", choices=TASK_NAMES, help="benchmark to run")
    parser.add_argument("--data", required=True, metavar="PATH", help=DATA_HELP)
    target = parser.add_argument_group("model under test (default: the packaged default model, in-process)")
    target.add_argument("--model", metavar="PATH", help="local checkpoint, run in-process by our engine")
    target.add_argument("--endpoint", metavar="URL",
                        help="OpenAI-compatible API base URL, e.g. http://localhost:8000/v1 (our server, vLLM, ...)")
    target.add_argument("--served-model", metavar="NAME", help="model name to request from --endpoint")
    target.add_argument("--api-key", metavar="KEY", help="API key for --endpoint (default: none)")
    from pixtral.cli.common import add_quantization_option, add_tensor_parallel_option

    add_tensor_parallel_option(target)
    add_quantization_option(target)
    run_opts = parser.add_argument_group("run")
    run_opts.add_argument("--output-dir", default="runs/eval", metavar="DIR", help="where results go (default: runs/eval)")
    run_opts.add_argument("--limit", type=_positive_int, metavar="N",
                          help="only the first N dataset records (conversations for mm_mt_bench and synth, "
                               "questions for mt_bench, problems for mmlu, math and humaneval)")
    run_opts.add_argument("--concurrency", type=_positive_int, default=8, metavar="K",
                          help="requests in flight (batch size for --model); default 8")
    run_opts.add_argument("--max-tokens", type=_positive_int, metavar="N",
                          help="override the task's max_tokens (protocol: 2048 CoT tasks and math, 10 "
                               "DocVQA/VQAv2, 4096 MM-MT-Bench, 64 synth, 1024 mt_bench and humaneval, 32 mmlu)")
    run_opts.add_argument("--timeout", type=_positive_float, default=600.0, metavar="S",
                          help="seconds per request before it is retried (default 600)")
    run_opts.add_argument("--retries", type=_positive_int, default=3, metavar="N",
                          help="attempts per request on timeouts, connection errors, 408, 409, 429 and 5xx, with the "
                               "openai client's backoff (default 3)")
    run_opts.add_argument("--blank-images", action="store_true",
                          help="replace every image with a white one of the same size (shows the model reads images)")
    run_opts.add_argument("--overwrite", action="store_true",
                          help="discard earlier results for this task in --output-dir instead of resuming")
    run_opts.add_argument("--no-progress", action="store_true", help="no progress bar")
    sampling = parser.add_argument_group("sampling (math: maj@k, humaneval: pass@k; default one greedy answer)")
    sampling.add_argument("--samples", type=_positive_int, default=1, metavar="K",
                          help="answers per problem (math, humaneval); with K > 1 they are sampled")
    sampling.add_argument("--temperature", type=_temperature, metavar="T",
                          help="sampling temperature (default: 0.6 math and 0.8 humaneval with --samples > 1, "
                               "else greedy; mt_bench: FastChat's temperature per category unless given)")
    sampling.add_argument("--seed", type=_non_negative_int, default=0, metavar="N",
                          help="seed the samples' seeds come from (each sample's depends on it, the problem "
                               "and its index; default 0)")
    sandbox = parser.add_argument_group("humaneval sandbox (limits per program)")
    sandbox.add_argument("--sandbox-timeout", type=_positive_float, metavar="S",
                         help="wall-clock seconds per program (default 10; CPU time is limited to the same)")
    sandbox.add_argument("--sandbox-memory", type=_positive_int, metavar="MB",
                         help="address space per process in MiB (default 1024)")
    judge = parser.add_argument_group("judge (mm_mt_bench and mt_bench)")
    judge.add_argument("--judge-endpoint", metavar="URL",
                       help="OpenAI-compatible API of the judge (default: https://api.openai.com/v1)")
    judge.add_argument("--judge-model", default=None, metavar="NAME",
                       help="judge model (default: gpt-4o-2024-05-13 for mm_mt_bench, FastChat's gpt-4 for mt_bench)")
    judge.add_argument("--judge-api-key", metavar="KEY", help="judge API key (default: $OPENAI_API_KEY)")
    judge.add_argument("--judge-no-image", action="store_true", help="do not show the image to the judge (mm_mt_bench)")
    judge.add_argument("--judge-attempts", type=_positive_int, default=3, metavar="N",
                       help="judge replies to ask for when one has no [[rating]] (default 3); then the turn is unrated")
    judge.add_argument("--no-judge", action="store_true",
                       help="only collect the answers; a later run with a judge rates them without re-querying")
    parser.set_defaults(func=run)


def _backend(args: argparse.Namespace):
    from pixtral.errors import ConfigError
    from pixtral.eval.backends import LocalBackend, OpenAIBackend

    if args.endpoint and args.model:
        raise ConfigError("--model and --endpoint are exclusive: evaluate a local checkpoint or an endpoint, not both")
    if args.endpoint and args.tensor_parallel_size not in (None, 1):
        raise ConfigError("--tensor-parallel-size is for a local --model; the endpoint's server splits its own model")
    if args.endpoint and args.quantization:
        raise ConfigError("--quantization is for a local --model; the endpoint's server loads its own model")
    if args.endpoint:
        if not args.served_model:
            raise ConfigError("--endpoint needs --served-model NAME (the model name the endpoint serves)")
        return OpenAIBackend(args.endpoint, args.served_model, api_key=args.api_key, timeout=args.timeout,
                             attempts=args.retries)
    if args.served_model:
        raise ConfigError("--served-model needs --endpoint URL")
    from pixtral.cli.common import check_tensor_parallel_size, resolve_device, tensor_parallel_size

    size = tensor_parallel_size(args)
    if size > 1:
        from pixtral.assets import default_model_dir

        check_tensor_parallel_size(args.model or default_model_dir(), size, resolve_device(None))
    return LocalBackend(args.model, max_batch=args.concurrency, tensor_parallel_size=size,
                        quantization=args.quantization)


def _judge(args: argparse.Namespace):
    from pixtral.errors import ConfigError
    from pixtral.eval import prompts
    from pixtral.eval.backends import OPENAI_BASE_URL, OpenAIBackend
    from pixtral.eval.judge import Judge

    if args.task not in JUDGED_TASKS or args.no_judge:
        return None
    if args.task == "mt_bench" and args.judge_no_image:
        raise ConfigError("--judge-no-image is for mm_mt_bench: mt_bench has no images")
    from pixtral.eval import mt_bench

    default_model = mt_bench.DEFAULT_JUDGE_MODEL if args.task == "mt_bench" else prompts.JUDGE_MODEL
    endpoint = args.judge_endpoint or OPENAI_BASE_URL
    api_key = args.judge_api_key or os.environ.get("OPENAI_API_KEY")
    if not args.judge_endpoint and not api_key:
        raise ConfigError(
            f"{args.task} needs a judge: set OPENAI_API_KEY to use OpenAI's {default_model}, or pass "
            "--judge-endpoint URL [--judge-model NAME] for any OpenAI-compatible API, or --no-judge to only "
            "collect answers")
    backend = OpenAIBackend(endpoint, args.judge_model or default_model, api_key=api_key, timeout=args.timeout,
                            attempts=args.retries, role="judge",
                            option="--judge-endpoint")
    if args.task == "mt_bench":
        return mt_bench.MTBenchJudge(backend, attempts=args.judge_attempts)
    return Judge(backend, include_image=not args.judge_no_image, attempts=args.judge_attempts)


def _check_task_options(args: argparse.Namespace) -> None:
    """Options that only some tasks take are refused, by name, for the others."""
    from pixtral.errors import ConfigError

    if args.samples > 1 and args.task not in SAMPLING_TASKS:
        raise ConfigError(f"--samples is for {' and '.join(SAMPLING_TASKS)} (maj@k, pass@k), not {args.task}")
    if args.temperature is not None and args.task not in (*SAMPLING_TASKS, "mt_bench"):
        raise ConfigError(f"--temperature is for math, humaneval and mt_bench; {args.task} is greedy by protocol")
    if args.temperature is not None and args.temperature > 2:
        raise ConfigError(f"--temperature must be from 0 to 2, got {args.temperature}")
    if args.task != "humaneval" and (args.sandbox_timeout is not None or args.sandbox_memory is not None):
        raise ConfigError("--sandbox-timeout and --sandbox-memory are for humaneval")


def run(args: argparse.Namespace) -> int:
    from pixtral.cli.common import require, torchrun_worker

    code = torchrun_worker(args)  # under torchrun, the ranks other than 0 serve rank 0's engine
    if code is not None:
        return code
    require("eval", "eval")

    from pixtral.eval.report import markdown
    from pixtral.eval.runner import RunConfig, evaluate, output_paths

    _check_task_options(args)
    judge = _judge(args)  # option errors before loading a model
    sandbox = None
    if args.task == "humaneval":
        from pixtral.eval.sandbox import SandboxLimits

        seconds = args.sandbox_timeout or SandboxLimits.timeout_s
        sandbox = SandboxLimits(timeout_s=seconds, cpu_s=max(1, math.ceil(seconds)),
                                memory_bytes=(args.sandbox_memory or SandboxLimits.memory_bytes >> 20) << 20)
    backend = _backend(args)
    try:
        config = RunConfig(task=args.task, data=args.data, output_dir=args.output_dir, limit=args.limit,
                           concurrency=args.concurrency, max_tokens=args.max_tokens, blank_images=args.blank_images,
                           overwrite=args.overwrite, progress=not args.no_progress, samples=args.samples,
                           temperature=args.temperature, seed=args.seed, sandbox=sandbox)
        result = evaluate(config, backend, judge)
    finally:
        backend.close()
        if judge is not None:
            judge.backend.close()
    print(markdown(result))
    paths = output_paths(args.output_dir, args.task)
    print(f"wrote {paths['json']}, {paths['items']}, {paths['summary']}, {paths['chart']}")
    if result["counts"]["failed"]:
        print(f"note: {result['counts']['failed']} item(s) failed and count as wrong; run the same command again "
              "to retry them")
    return 0
