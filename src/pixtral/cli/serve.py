"""`pixtral serve`: an OpenAI-compatible chat server for a model."""

from __future__ import annotations

import argparse
import logging
import os
import sys

HELP = """\
Serve a model over an OpenAI-compatible HTTP API (POST /v1/chat/completions, streamed or not;
POST /v1/completions, raw text prompts with echo and logprobs; GET /v1/models, /health, /metrics). Images are accepted as data: URIs; remote http(s) images
only with --allow-remote-images (never from loopback or private addresses); local paths never.
The server answers 503 until the model is loaded.

A chat page is served at / (open http://HOST:PORT/ in a browser): attach images, ask, watch the
answer stream. It is a small static page shipped in the package; it talks only to this server
and asks once for the --api-key if one is set. --no-web leaves it out.

Limits that keep one client from starving the others: --max-connections (a new connection over
it closes the longest-idle one, or gets a 503 when all are busy), --header-timeout and
--body-timeout (a slow or idle client is answered 408 and closed), --max-request-mb, and the
image decode budget (--image-decode-mpixels, --image-decode-workers: at most that many pixels
and images decode at once, up to about 25 bytes a pixel at the peak).

With --tensor-parallel-size N the model is split over N GPUs, one worker process each, started
and stopped by the server; if a worker dies, the server answers 503 and exits with an error
naming it. Several nodes: the same command under torchrun (docs/serving.md).

examples:
  pixtral serve --model ~/models/Pixtral-12B-2409 --port 8000
  pixtral serve --model ckpt --host 0.0.0.0 --api-key "$KEY" --allow-remote-images
  pixtral serve --model ~/models/Pixtral-Large-Instruct-2411 --tensor-parallel-size 8
"""


def register(subparsers) -> None:
    from pixtral.cli.common import add_model_options, add_tensor_parallel_option
    from pixtral.processing.images import DEFAULT_MAX_PIXELS

    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API", description=HELP,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--served-model-name", help="the 'model' name clients send (default: the checkpoint folder's name)")
    p.add_argument("--api-key", action=_ApiKey, default=os.environ.get("PIXTRAL_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $PIXTRAL_API_KEY; none: open)")
    p.set_defaults(api_key_given=False)
    p.add_argument("--no-web", action="store_true", help="do not serve the web chat page at /")
    g = p.add_argument_group("images")
    g.add_argument("--allow-remote-images", action="store_true",
                   help="also fetch http(s) image URLs (public addresses only, with size and time limits)")
    g.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"refuse larger images before decoding them (default {DEFAULT_MAX_PIXELS})")
    g.add_argument("--max-image-mb", type=float, default=20.0, help="largest encoded image, in MB (default 20)")
    g.add_argument("--remote-image-timeout", type=float, default=10.0, help="seconds per remote image (default 10)")
    g.add_argument("--max-images-per-request", type=int, default=64, help="default 64")
    g.add_argument("--image-decode-mpixels", type=float, default=DEFAULT_MAX_PIXELS / 1e6,
                   help=f"megapixels decoded at once, across requests (default {DEFAULT_MAX_PIXELS / 1e6:.1f}: "
                        "one image at the pixel limit)")
    g.add_argument("--image-decode-workers", type=int, default=2, help="images decoded at once (default 2)")
    g = p.add_argument_group("connections")
    g.add_argument("--max-connections", type=int, default=1024,
                   help="open connections (default 1024; lowered to fit the open-file limit)")
    g.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a client has to send a request's headers (default 10)")
    g.add_argument("--body-timeout", type=float, default=60.0,
                   help="seconds a client has to send a request's body (default 60)")
    g.add_argument("--keep-alive-timeout", type=float, default=5.0,
                   help="seconds an idle connection stays open between requests (default 5)")
    g = p.add_argument_group("engine")
    g.add_argument("--max-num-seqs", type=int, help="most requests decoded together (default: CPU 64, GPU 256)")
    g.add_argument("--max-num-batched-tokens", type=int, help="tokens per step (default: CPU 2048, GPU 8192)")
    g.add_argument("--prefill-tokens-while-decoding", type=int,
                   help="prompt tokens per step while requests decode, so they keep their pace (0: no cap; "
                        "default: CPU 256, GPU 0)")
    g.add_argument("--max-model-len", type=int, help="longest sequence (default: the model's context length)")
    g.add_argument("--kv-cache-gib", type=float, help="KV-cache memory (default: GPU 90%% of the card less the "
                                                      "model, CPU a fifth of RAM up to 4 GiB)")
    g.add_argument("--max-queue", type=int, default=1024, help="waiting requests before answering 429 (default 1024)")
    g.add_argument("--max-request-mb", type=float, default=100.0, help="largest request body (default 100)")
    g.add_argument("--no-prefix-caching", action="store_true", help="do not reuse KV blocks of shared prefixes")
    g.add_argument("--no-cuda-graphs", action="store_true", help="GPU: run the decode step eagerly")
    add_tensor_parallel_option(g)
    p.set_defaults(func=run)


class _ApiKey(argparse.Action):
    """--api-key, remembering that it was given (an empty key is refused naming where it came from)."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.api_key, namespace.api_key_given = values, True


def _positive(name: str, value) -> None:
    from pixtral.errors import PixtralError

    if value is not None and value <= 0:
        raise PixtralError(f"{name} must be positive, got {value}")


def run(args: argparse.Namespace) -> int:
    from pixtral.cli.common import require, torchrun_worker

    code = torchrun_worker(args)  # under torchrun, the ranks other than 0 serve rank 0's engine
    if code is not None:
        return code
    require("server", "serve")

    from pathlib import Path

    import uvicorn

    from pixtral.assets import default_model_dir
    from pixtral.checkpoint import find_files, read_args
    from pixtral.cli.common import DTYPES, check_tensor_parallel_size, resolve_device, tensor_parallel_size
    from pixtral.engine import AsyncEngine
    from pixtral.errors import PixtralError
    from pixtral.processing.images import ImagePolicy
    from pixtral.processing.images import DecodeBudget
    from pixtral.server import ServerConfig, ServerState, build_app
    from pixtral.server.connections import ConnectionLimits, raise_file_limit, uvicorn_config
    from pixtral.server.connections import run as run_server

    if args.prefill_tokens_while_decoding is not None and args.prefill_tokens_while_decoding < 0:
        raise PixtralError(f"--prefill-tokens-while-decoding must be 0 (no cap) or positive, "
                           f"got {args.prefill_tokens_while_decoding}")
    for name in ("max_image_pixels", "max_image_mb", "remote_image_timeout", "max_images_per_request",
                 "max_num_seqs", "max_num_batched_tokens", "max_model_len", "kv_cache_gib", "max_queue",
                 "max_request_mb", "image_decode_mpixels", "image_decode_workers", "max_connections",
                 "header_timeout", "body_timeout", "keep_alive_timeout"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    if args.api_key is not None and not args.api_key.strip():
        where = "--api-key" if args.api_key_given else "$PIXTRAL_API_KEY"
        raise PixtralError(f"{where} is empty: give a key, or leave it out to serve without one")
    if not 0 < args.port < 65536:
        raise PixtralError(f"--port must be in 1..65535, got {args.port}")
    path = Path(args.model).expanduser() if args.model else default_model_dir()
    read_args(find_files(path))  # a wrong path fails now, not after the server has started
    device = resolve_device(args.device)
    tp = tensor_parallel_size(args)
    check_tensor_parallel_size(path, tp, device)  # a size the model or the machine cannot take fails now
    budget = DecodeBudget(max(1, int(args.image_decode_mpixels * 1e6)), args.image_decode_workers)
    policy = ImagePolicy(max_pixels=args.max_image_pixels, max_bytes=int(args.max_image_mb * 2**20),
                         allow_local_files=False, allow_remote=args.allow_remote_images,
                         block_private_networks=True, timeout_s=args.remote_image_timeout, budget=budget)
    options = {
        "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
        "max_model_len": args.max_model_len, "max_waiting": args.max_queue,
        "prefill_tokens_while_decoding": args.prefill_tokens_while_decoding,
        "kv_cache_bytes": int(args.kv_cache_gib * 2**30) if args.kv_cache_gib else None,
        "enable_prefix_caching": not args.no_prefix_caching, "cuda_graphs": not args.no_cuda_graphs,
        "tensor_parallel_size": tp,
    }
    config = ServerConfig(model_name=args.served_model_name or path.resolve().name, api_key=args.api_key,
                          image_policy=policy, max_images_per_request=args.max_images_per_request,
                          max_request_bytes=int(args.max_request_mb * 2**20), body_timeout_s=args.body_timeout,
                          web_page=not args.no_web)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    max_connections = raise_file_limit(args.max_connections)
    if max_connections < args.max_connections:
        logging.getLogger("pixtral.server").warning(
            "--max-connections lowered from %d to %d to stay under the open-file limit", args.max_connections,
            max_connections)
    limits = ConnectionLimits(max_connections, args.header_timeout, args.keep_alive_timeout)
    state = ServerState()
    server = uvicorn.Server(uvicorn_config(build_app(state, config), limits, host=args.host, port=args.port,
                                           log_level="info", timeout_graceful_shutdown=5))
    failed, workers_failed = [], []

    def on_error(exc: BaseException) -> None:
        failed.append(exc)
        server.should_exit = True

    def on_worker_failure(exc: BaseException) -> None:  # from the executor's watcher thread
        logging.getLogger("pixtral.server").error("%s: the engine cannot go on; answering 503 and shutting down", exc)
        workers_failed.append(exc)
        server.should_exit = True

    def load() -> AsyncEngine:
        engine = AsyncEngine.from_pretrained(path, device, DTYPES.get(args.dtype), image_policy=policy,
                                             quantization=args.quantization, **options)
        engine.on_worker_failure(on_worker_failure)
        return engine

    state.load_in_background(load, on_error)
    logging.getLogger("pixtral.server").info("serving %r at http://%s:%d/v1 (loading the model...)",
                                             config.model_name, args.host, args.port)
    if config.web_page:
        logging.getLogger("pixtral.server").info("chat page: http://%s:%d/", _url_host(args.host), args.port)
    if getattr(args, "open_browser", False):
        _open_browser_when_started(server, f"http://{_url_host(args.host)}:{args.port}/")
    if tp == 1:
        run_server(server)
        if state.engine is not None:
            state.engine.shutdown()
    else:
        _run_supervised(server, state, workers_failed)
    if failed:
        raise PixtralError(f"could not load the model: {state.load_error}")
    return 0


def _url_host(host: str) -> str:
    """The host part of a URL a browser on this machine can open."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _open_browser_when_started(server, url: str) -> None:
    """Open `url` in the user's browser once the server listens (`pixtral chat --web`). The page
    itself waits for the model to load."""
    import threading
    import time
    import webbrowser

    def wait_and_open() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started:
            print(f"chat page: {url}", flush=True)
            webbrowser.open(url)  # no browser (a headless machine): nothing happens, the URL is printed

    threading.Thread(target=wait_and_open, name="pixtral-open-browser", daemon=True).start()


class _Terminated(BaseException):
    pass


def _raise_terminated(signum, frame) -> None:
    raise _Terminated()


def _run_supervised(server, state, workers_failed: list) -> None:
    """Serve with tensor-parallel workers: whatever ends the server (SIGTERM, SIGINT, a dead worker),
    the engine and every worker are stopped and reaped before this process exits.

    uvicorn handles SIGINT and SIGTERM itself, then raises the signal again once it has shut down:
    SIGTERM is made an exception here so that the workers are stopped first; then the process dies
    by the signal as it would with one process.
    """
    import signal

    from pixtral.server.connections import run as run_server

    terminated = False
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        run_server(server)
    except _Terminated:
        terminated = True
    finally:
        signal.signal(signal.SIGTERM, previous)  # a second SIGTERM during the shutdown below kills at once
        if state.engine is not None:
            state.engine.shutdown()  # the engine thread, then the workers (asked to stop, else killed)
    if workers_failed:
        # Every worker is stopped and reaped by now. Exit at once: a thread may still be caught in a
        # collective with the dead rank (NCCL), and interpreter teardown must not wait on it.
        print(f"error: {workers_failed[0]}", file=sys.stderr, flush=True)
        logging.shutdown()
        os._exit(1)
    if terminated:
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGTERM)
