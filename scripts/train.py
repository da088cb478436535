"""Pretraining under accelerate: `accelerate launch scripts/train.py CONFIG [--section.field=value] [--resume [DIR]]`.

The same as `zoo train CONFIG ...`; all logic lives in zoo.train.
"""

from __future__ import annotations

import sys

from zoo.train import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
