"""Benchmark: greedy decoding's argmax over the vocabulary (zoo_kernels.argmax) against torch.argmax.

Both inside a CUDA graph (`ceilings.graph_ms`), as a captured decode step runs them, on bf16 logits [B, V] with
V = 50280 (the 130M models' padded GPT-NeoX vocabulary); torch's result copied into a fixed token buffer, as the
graph's step does. Each call is checked against torch.argmax first. The floor is the logits' bytes over the copy
bandwidth measured in the same run. Rows go to --out (JSON lines).

    python benchmarks/argmax.py --batches 1,16,64 --out benchmarks/results.jsonl
"""

from __future__ import annotations

import argparse
import sys
from datetime import date

import torch
from ceilings import describe, floor_ms, graph_ms, rows_kept_on_interrupt, sizes  # benchmarks/ceilings.py


def measure(batch: int, vocab: int, card: str) -> dict:
    from zoo_kernels.argmax import argmax_rows

    x = torch.randn(batch, vocab, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    x = x.to(torch.bfloat16)
    out = torch.empty(batch, dtype=torch.int64, device="cuda")
    ref = x.argmax(-1)
    if not torch.equal(argmax_rows(x, out), ref):
        raise RuntimeError(f"argmax_rows differs from torch.argmax at batch {batch}")
    ours = graph_ms(lambda: argmax_rows(x, out))
    theirs = graph_ms(lambda: out.copy_(x.argmax(-1)))
    floor = floor_ms(x.numel() * x.element_size() + 8 * batch)
    print(f"batch {batch:3d} V {vocab}: argmax_rows {ours * 1e3:6.2f} us  torch.argmax + copy {theirs * 1e3:6.2f} us "
          f"({theirs / ours:.2f}x)  floor {floor * 1e3:.2f} us", flush=True)
    return {
        "name": f"argmax/V{vocab}/B{batch}", "card": card, "date": date.today().isoformat(),
        "command": " ".join(["python", *sys.argv]), "torch": torch.__version__,
        "shape": {"batch": batch, "V": vocab, "dtype": "bf16"},
        "ours_ms": round(ours, 5), "baseline": "torch.argmax + copy into the token buffer",
        "baseline_ms": round(theirs, 5), "ratio": round(theirs / ours, 3), "floor_ms": round(floor, 5),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=sizes, default="1,16,64", help="comma-separated batch sizes")
    ap.add_argument("--vocab", type=int, default=50280)
    ap.add_argument("--out", default=None, help="append JSON lines here (e.g. benchmarks/results.jsonl)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("argmax.py needs a CUDA device")
    card = torch.cuda.get_device_name()
    print(f"{card}, torch {torch.__version__}; {describe()}", flush=True)
    # Ctrl-C or SIGTERM: the rows measured are written, noted as cut short, and the run exits 130
    with rows_kept_on_interrupt(args.out, "argmax.py") as rows:
        for b in args.batches:
            rows.append(measure(b, args.vocab, card))


if __name__ == "__main__":
    main()
