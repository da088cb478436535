"""Benchmark: the fused cross entropy (zoo_kernels.cross_entropy), forward + backward, against torch.

On bf16 logits [N, V] (V = 50280, the 130M models' padded vocabulary), as the model's loss runs it: the loss, then
its gradient into the logits. The baselines run in the same process: torch's F.cross_entropy on the logits cast to
fp32 (as transformers' causal-LM loss and zoo's unfused path compute it), and, with --against FILE, another version
of zoo's kernel module (say the previous commit's, written out with
`git show REV:kernels/zoo_kernels/cross_entropy.py > .baselines/ce_old.py`). Each is checked against torch's fp32
loss and gradient first. The floor reads the logits twice and writes their gradient once, over the copy bandwidth
measured in the same run. Rows go to --out (JSON lines).

    python benchmarks/cross_entropy.py --rows 4096,16384 --against .baselines/ce_old.py --out benchmarks/results.jsonl
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from datetime import date

import torch
import torch.nn.functional as F
import triton
from ceilings import describe, floor_ms, rows_kept_on_interrupt, sizes  # benchmarks/ceilings.py


def fwd_bwd_ms(ce, x: torch.Tensor, t: torch.Tensor) -> float:
    def step():
        x.grad = None
        ce(x, t).backward()
    return triton.testing.do_bench(step, warmup=5, rep=50, return_mode="median")


def check(name: str, ce, x: torch.Tensor, t: torch.Tensor, ref_loss: torch.Tensor, ref_grad: torch.Tensor) -> None:
    x.grad = None
    loss = ce(x, t)
    loss.backward()
    err = (x.grad.float() - ref_grad).abs().max().item() / ref_grad.abs().max().item()
    if abs(loss.item() - ref_loss.item()) > 1e-4 * abs(ref_loss.item()) or err > 2e-2:
        raise RuntimeError(f"{name}: loss {loss.item()} against {ref_loss.item()}, gradient off by {err:.2e}")


def measure(rows: int, vocab: int, card: str, against: str | None) -> list[dict]:
    from zoo_kernels.cross_entropy import cross_entropy

    g = torch.Generator("cuda").manual_seed(0)
    x = (4 * torch.randn(rows, vocab, device="cuda", generator=g)).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, vocab, (rows,), device="cuda", generator=g)
    t[::7] = -100  # some ignored targets, as padded rows have
    x32 = x.detach().float().requires_grad_()
    ref_loss = F.cross_entropy(x32, t)
    ref_loss.backward()
    impls = {"zoo": cross_entropy, "torch F.cross_entropy(logits.float())": lambda x, t: F.cross_entropy(x.float(), t)}
    if against:
        spec = importlib.util.spec_from_file_location("ce_against", against)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        impls[f"zoo kernel from {against}"] = module.cross_entropy
    times = {}
    for name, ce in impls.items():
        check(name, ce, x, t, ref_loss, x32.grad)
        times[name] = fwd_bwd_ms(ce, x, t)
    floor = floor_ms(3 * x.numel() * x.element_size())
    ours = times.pop("zoo")
    line = "  ".join(f"{n} {ms:.3f} ms ({ms / ours:.2f}x)" for n, ms in times.items())
    print(f"N {rows:6d} V {vocab}: zoo {ours:.3f} ms  {line}  floor {floor:.3f} ms", flush=True)
    row = {
        "name": f"cross_entropy/V{vocab}/N{rows}", "card": card, "date": date.today().isoformat(),
        "command": " ".join(["python", *sys.argv]), "torch": torch.__version__,
        "shape": {"rows": rows, "V": vocab, "dtype": "bf16"}, "ours_ms": round(ours, 4), "floor_ms": round(floor, 4),
        "note": "forward + backward (triton do_bench median); every 7th target ignored",
    }
    return [{**row, "baseline": n, "baseline_ms": round(ms, 4), "ratio": round(ms / ours, 3)}
            for n, ms in times.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=sizes, default="4096,16384", help="comma-separated token counts N")
    ap.add_argument("--vocab", type=int, default=50280)
    ap.add_argument("--against", default=None, help="another cross_entropy.py to time side by side")
    ap.add_argument("--out", default=None, help="append JSON lines here (e.g. benchmarks/results.jsonl)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("cross_entropy.py needs a CUDA device")
    card = torch.cuda.get_device_name()
    print(f"{card}, torch {torch.__version__}; {describe()}", flush=True)
    # Ctrl-C or SIGTERM: the rows measured are written, noted as cut short, and the run exits 130
    with rows_kept_on_interrupt(args.out, "cross_entropy.py") as rows:
        for n in args.rows:
            rows.extend(measure(int(n), args.vocab, card, args.against))


if __name__ == "__main__":
    main()
