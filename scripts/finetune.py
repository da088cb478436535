"""LoRA finetuning under accelerate: `accelerate launch scripts/finetune.py CONFIG [--section.field=value ...]`.

The same as `zoo finetune CONFIG`; all logic lives in zoo.finetune.
"""

from __future__ import annotations

import sys

from zoo.finetune import main

if __name__ == "__main__":
    main(sys.argv[1:])
