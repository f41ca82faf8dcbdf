"""`pixtral chat`: talk to a model about images in the terminal."""

from __future__ import annotations

import argparse
import sys

from pixtral.cli.common import add_model_options, add_tensor_parallel_option, load_model_and_processor
from pixtral.errors import PixtralError

HELP = """\
Ask a question about one or more images. With a PROMPT, prints one answer as it is generated.
Without one, starts an interactive chat: type a message and press Enter; '/image FILE' attaches
an image to your next message, '/reset' starts over, '/quit' (or Ctrl-D) leaves.
With --web, opens the chat page in your browser instead (a local `pixtral serve` on a free
port; drop or paste images there; Ctrl-C stops it).

examples:
  pixtral chat --image examples/chart.png "What is the value of bar G?"
  pixtral chat --model ~/models/Pixtral-12B-2409 --image photo.jpg
  pixtral chat --web
  pixtral chat --model ~/models/Pixtral-Large-Instruct-2411 --tensor-parallel-size 8 --image photo.jpg
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("chat", help="chat with a model about images", description=HELP,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(p)
    p.add_argument("prompt", nargs="?", help="the question; omit it for an interactive chat")
    p.add_argument("--image", action="append", default=[], metavar="FILE",
                   help="image file or URL to show the model (repeat for several)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=512, help="most tokens per answer (default 512)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--web", action="store_true",
                   help="open the web chat page in a browser (a local server on a free port) instead")
    add_tensor_parallel_option(p)
    p.set_defaults(func=run)


def _user_message(text: str, images: list[str]) -> dict:
    if not images:
        return {"role": "user", "content": text}
    parts = [{"type": "image_url", "image_url": {"url": img}} for img in images]
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


def _answer(model, processor, messages, params, out) -> str:
    """`model`: the model itself (the plain generation loop), or an `LLM` (a tensor-parallel engine)."""
    from pixtral.engine import LLM
    from pixtral.generation import stream_chat

    if isinstance(model, LLM):
        pieces = (d.text for d in model.stream_chat(messages, params) if not _failed(d))
    else:
        pieces = (p for p in stream_chat(model, processor, messages, params) if isinstance(p, str))
    text = ""
    for piece in pieces:
        if piece:
            out.write(piece)
            out.flush()
            text += piece
    out.write("\n")
    return text


def _failed(delta) -> bool:
    if delta.error:
        raise PixtralError(delta.error)
    return False


def _load(args: argparse.Namespace):
    """(model, processor, closer): the model in this process, or over --tensor-parallel-size ranks."""
    from pixtral.cli.common import DTYPES, check_tensor_parallel_size, resolve_device, tensor_parallel_size

    size = tensor_parallel_size(args)
    if size == 1:
        model, processor = load_model_and_processor(args)
        return model, processor, lambda: None
    from pixtral.assets import default_model_dir
    from pixtral.engine import LLM

    path = args.model or default_model_dir()
    device = resolve_device(args.device)
    check_tensor_parallel_size(path, size, device)
    llm = LLM(path, device, DTYPES.get(args.dtype), quantization=args.quantization, tensor_parallel_size=size)
    return llm, llm.processor, llm.close


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_web(args: argparse.Namespace) -> int:
    """`pixtral chat --web`: `pixtral serve` on 127.0.0.1 and a free port, and the page opened in a browser."""
    from pixtral.cli import serve

    if args.prompt is not None or args.image:
        raise PixtralError("--web opens the chat page, where you attach images and type: give no PROMPT or --image "
                           "with it")
    argv = ["serve", "--host", "127.0.0.1", "--port", str(_free_port())]
    for option in ("model", "device", "dtype", "quantization", "tensor_parallel_size"):
        if getattr(args, option) is not None:
            argv += ["--" + option.replace("_", "-"), str(getattr(args, option))]
    parser = argparse.ArgumentParser(prog="pixtral")
    serve.register(parser.add_subparsers())
    serve_args = parser.parse_args(argv)  # every other serve option at its default
    serve_args.open_browser = True
    return serve.run(serve_args)


def run(args: argparse.Namespace) -> int:
    from pixtral.cli.common import torchrun_worker

    if args.web:
        return _run_web(args)
    code = torchrun_worker(args)  # under torchrun, the ranks other than 0 serve rank 0's engine
    if code is not None:
        return code
    from pixtral.generation import SamplingParams
    from pixtral.processing import load_image

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, seed=args.seed)
    for img in args.image:  # fail on a bad image before loading a large model
        load_image(img)
    model, processor, close = _load(args)
    try:
        return _chat(args, model, processor, params)
    finally:
        close()


def _chat(args: argparse.Namespace, model, processor, params) -> int:
    from pixtral.processing import load_image

    history = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        _answer(model, processor, history + [_user_message(args.prompt, args.image)], params, sys.stdout)
        return 0

    pending_images = list(args.image)
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            history = history[:1] if args.system else []
            pending_images = []
            print("(conversation cleared)")
            continue
        if line.startswith("/image "):
            path = line[len("/image "):].strip()
            try:
                load_image(path)
            except PixtralError as exc:
                print(f"error: {exc}", file=sys.stderr)
                continue
            pending_images.append(path)
            print(f"(image attached to your next message: {path})")
            continue
        message = _user_message(line, pending_images)
        pending_images = []
        if interactive:
            sys.stdout.write("pixtral> ")
        try:
            reply = _answer(model, processor, history + [message], params, sys.stdout)
        except PixtralError as exc:
            from pixtral.engine.executor import TensorParallelError

            if isinstance(exc, TensorParallelError):  # a rank is gone: no later answer can come
                raise
            print(f"error: {exc}", file=sys.stderr)
            continue
        history += [message, {"role": "assistant", "content": reply}]
