"""LoRA finetuning under accelerate: `accelerate launch scripts/finetune.py CONFIG [--section.field=value ...]`.

The same as `zoo finetune CONFIG`; all logic lives in zoo.finetune.
"""

from __future__ import annotations

import sys

from zoo.cli import _exit, _run
from zoo.finetune import main

if __name__ == "__main__":  # bad input ends in one line and exit status 2, an interruption in 130, as `zoo finetune`
    _exit(_run("zoo finetune", main, sys.argv[1:]))
