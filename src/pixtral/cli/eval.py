"""`pixtral eval TASK`: evaluate a model on MM-MT-Bench, MMMU, MathVista, ChartQA, DocVQA, VQAv2 or synth.

Examples:
  pixtral eval chartqa --data ~/data/ChartQA --endpoint http://localhost:8000/v1 --served-model pixtral
  pixtral eval mm_mt_bench --data ~/data/MM-MT-Bench --model ./checkpoints/pixtral-12b \\
      --judge-endpoint https://api.openai.com/v1        # judge key from OPENAI_API_KEY
  pixtral eval synth --data out/synth --blank-images --output-dir runs/eval-blank
"""

from __future__ import annotations

import argparse
import os

from pixtral.eval.tasks import TASK_NAMES

DATA_HELP = (
    "local copy of the dataset in its public format: a parquet/arrow file or a Hugging Face dataset folder "
    "(mm_mt_bench: mistralai/MM-MT-Bench split eval; mmmu: lmms-lab/MMMU validation; mathvista: "
    "AI4Math/MathVista testmini; chartqa: lmms-lab/ChartQA test; docvqa: lmms-lab/DocVQA config DocVQA "
    "validation; vqav2: HuggingFaceM4/VQAv2 or lmms-lab/VQAv2 validation; synth: the folder written by "
    "`pixtral data synth --out DIR`, or its test.jsonl)"
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


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a model on a benchmark (paper protocol, resumable)",
        description=(
            "Evaluate a model with the Pixtral paper's protocol (Explicit prompts, greedy decoding, strict and "
            "flexible parsing) plus the released mistral-evals metrics for comparison. Results go to "
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
                          help="only the first N dataset records (conversations for mm_mt_bench and synth)")
    run_opts.add_argument("--concurrency", type=_positive_int, default=8, metavar="K",
                          help="requests in flight (batch size for --model); default 8")
    run_opts.add_argument("--max-tokens", type=_positive_int, metavar="N",
                          help="override the task's max_tokens (protocol: 2048 CoT tasks, 10 DocVQA/VQAv2, "
                               "4096 MM-MT-Bench, 64 synth)")
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
    judge = parser.add_argument_group("MM-MT-Bench judge")
    judge.add_argument("--judge-endpoint", metavar="URL",
                       help="OpenAI-compatible API of the judge (default: https://api.openai.com/v1)")
    judge.add_argument("--judge-model", default=None, metavar="NAME", help="judge model (default: gpt-4o-2024-05-13)")
    judge.add_argument("--judge-api-key", metavar="KEY", help="judge API key (default: $OPENAI_API_KEY)")
    judge.add_argument("--judge-no-image", action="store_true", help="do not show the image to the judge")
    judge.add_argument("--judge-attempts", type=_positive_int, default=3, metavar="N",
                       help="judge replies to ask for when one has no [[rating]] (default 3); then the turn is unrated")
    judge.add_argument("--no-judge", action="store_true",
                       help="only collect MM-MT-Bench answers; a later run with a judge rates them without re-querying")
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

    if args.task != "mm_mt_bench" or args.no_judge:
        return None
    endpoint = args.judge_endpoint or OPENAI_BASE_URL
    api_key = args.judge_api_key or os.environ.get("OPENAI_API_KEY")
    if not args.judge_endpoint and not api_key:
        raise ConfigError(
            "mm_mt_bench needs a judge: set OPENAI_API_KEY to use OpenAI's gpt-4o-2024-05-13, or pass "
            "--judge-endpoint URL [--judge-model NAME] for any OpenAI-compatible API, or --no-judge to only "
            "collect answers")
    backend = OpenAIBackend(endpoint, args.judge_model or prompts.JUDGE_MODEL, api_key=api_key, timeout=args.timeout,
                            attempts=args.retries, role="judge",
                            option="--judge-endpoint")
    return Judge(backend, include_image=not args.judge_no_image, attempts=args.judge_attempts)


def run(args: argparse.Namespace) -> int:
    from pixtral.cli.common import require, torchrun_worker

    code = torchrun_worker(args)  # under torchrun, the ranks other than 0 serve rank 0's engine
    if code is not None:
        return code
    require("eval", "eval")

    from pixtral.eval.report import markdown
    from pixtral.eval.runner import RunConfig, evaluate, output_paths

    judge = _judge(args)  # option errors before loading a model
    backend = _backend(args)
    try:
        config = RunConfig(task=args.task, data=args.data, output_dir=args.output_dir, limit=args.limit,
                           concurrency=args.concurrency, max_tokens=args.max_tokens, blank_images=args.blank_images,
                           overwrite=args.overwrite, progress=not args.no_progress)
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
