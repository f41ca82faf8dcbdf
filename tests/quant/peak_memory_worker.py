"""Load a checkpoint in a fresh process and report the peak of its anonymous memory, for test_quantize_on_load.py.

Anonymous memory (`RssAnon` in /proc/self/status), not the whole RSS: the loader reads tensors from
memory-mapped files, whose pages count in the RSS while mapped but are the page cache, not a copy of
the model. A thread samples it every millisecond while the load runs; the float weights of a model
held for the whole load (a full float copy) cannot slip between samples.

usage: python peak_memory_worker.py CHECKPOINT MODE
MODE: "on-load" (load_model(..., quantization="int8")) or "float-then-quantize" (the float model,
then quantize_linears). Prints one JSON line: {"peak_increase": bytes, "model_bytes": bytes}.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import torch

from pixtral.checkpoint import load_model
from pixtral.quant import quantize_linears


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def main(path: str, mode: str) -> None:
    torch.set_num_threads(1)
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon())
            time.sleep(0.001)

    baseline = rss_anon()
    sampler = threading.Thread(target=sample)
    sampler.start()
    if mode == "on-load":
        model = load_model(path, dtype=torch.float32, quantization="int8")
    else:
        model = load_model(path, dtype=torch.float32)
        quantize_linears(model, "int8")
    done.set()
    sampler.join()
    peak[0] = max(peak[0], rss_anon())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"peak_increase": peak[0] - baseline, "model_bytes": model_bytes}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
