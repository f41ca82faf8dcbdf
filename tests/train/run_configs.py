"""Test helper, run once per rank: train each config given in turn, in one process group, so
that several distributed runs cost one process start."""

import sys

from pixtral.train import distributed
from pixtral.train.config import load_config
from pixtral.train.trainer import train

if __name__ == "__main__":
    d = distributed.setup("cpu")
    try:
        for path in sys.argv[1:]:
            train(load_config(path))
    finally:
        distributed.teardown(d)
