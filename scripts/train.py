"""Pretraining under accelerate: `accelerate launch scripts/train.py CONFIG [--section.field=value] [--resume [DIR]]`.

The same as `zoo train CONFIG ...`; all logic lives in zoo.train.
"""

from __future__ import annotations

import sys

from zoo.cli import _exit, _run
from zoo.train import main

if __name__ == "__main__":  # bad input ends in one line and exit status 2, an interruption in 130, as `zoo train`
    _exit(_run("zoo train", main, sys.argv[1:]))
