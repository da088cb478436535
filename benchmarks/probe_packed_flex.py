"""Probe: flex_attention's forward on packed rows at other tile configs than its default, against FA2 varlen.

Packed rows at (8, 2048, 16 x 128) are the one case of issue 4 under its target: the forward runs 0.84x the
unpacked rows (FA2 varlen ~151 TFLOP/s on the documents' FLOPs; flex at its default tiles ~163). This times, in one
process and on the same rows as benchmarks/attention.py (same generator), the forward without autograd of: our
call (auto), FA2 varlen raw, unpacked rows (our call: cuDNN), and flex with each kernel_options variant below, each
checked against the fp32 reference first. Block masks of 128 (flex's default) and 64 tokens.

    python benchmarks/probe_packed_flex.py [--shape 8:2048:16:128]

With --grad, forward+backward instead (leaves requiring grad): FA2 varlen (what auto runs for calls that need
gradients), flex at its defaults and flex with 64-token blocks and FLEX_PACKED_FWD's forward tiles (backward at
flex's own tiles); plus the time to make each block mask (a new one per training batch).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import zoo_kernels.attention as attn
from attention import bench_ms, packed_rows  # benchmarks/attention.py (the script's folder is on sys.path)

VARIANTS = [  # (block mask size, kernel_options or None for flex's own default)
    (128, None),
    (128, dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2)),
    (128, dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)),
    (128, dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3)),
    (128, dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)),
    (64, dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)),
    (64, dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=4)),
]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="8:2048:16:128")
    p.add_argument("--budget-s", type=float, default=240, help="stop starting new variants after this long")
    p.add_argument("--grad", action="store_true", help="time forward+backward (see the module doc)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("probe_packed_flex.py needs a CUDA GPU")
    if args.grad:
        return grad_main(args)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    b, L, h, d = (int(v) for v in args.shape.split(":"))
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(1)
    seq_idx, doc_flops = packed_rows(b, L, h, d, gen)
    seq_idx = seq_idx.to(dev)
    q, k, v = (torch.randn(b, L, h, d, device=dev, dtype=torch.bfloat16) for _ in range(3))
    ref = attn.attention_ref(q.float(), k.float(), v.float(), seq_idx=seq_idx)
    t_start = time.time()

    def report(name, fn):
        out = fn()
        err = ((out.float() - ref).norm() / ref.norm()).item()
        ms = bench_ms(fn)
        print(f"{name:58s} {ms:7.4f} ms  {doc_flops / ms / 1e9:6.1f} TFLOP/s on the documents  err {err:.1e}",
              flush=True)
        return ms

    with torch.no_grad():
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: packed ({b}, {L}, {h} x {d}), "
              f"{int(seq_idx[:, -1].sum()) + b} documents", flush=True)
        unpacked = report("unpacked rows, our call (auto)", lambda: attn.attention(q, k, v))
        ours = report("packed, our call (auto)", lambda: attn.attention(q, k, v, seq_idx=seq_idx))
        doc = attn.document_ids(seq_idx)
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        for size, opts in VARIANTS:
            if time.time() - t_start > args.budget_s:
                print("budget spent: later variants not run", flush=True)
                break

            def mask_mod(bi, hi, qi, kj):
                return (kj <= qi) & (doc[bi, qi] == doc[bi, kj])

            bm = create_block_mask(mask_mod, b, None, L, L, device=dev, BLOCK_SIZE=size, _compile=True)
            torch._dynamo.reset()
            fn = torch.compile(flex_attention)
            try:
                report(f"flex, mask blocks {size}, {opts or 'default'}",
                       lambda fn=fn, bm=bm, opts=opts: fn(qt, kt, vt, block_mask=bm,
                                                          kernel_options=opts).transpose(1, 2))
            except Exception as exc:  # a config that does not compile or launch is reported, not fatal
                print(f"flex {size} {opts}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
        print(f"packed / unpacked (time ratio, our call): {unpacked / ours:.3f}")


def grad_main(args) -> None:
    from torch.nn.attention.flex_attention import flex_attention

    b, L, h, d = (int(v) for v in args.shape.split(":"))
    dev = torch.device("cuda")
    seq_idx, doc_flops = packed_rows(b, L, h, d, torch.Generator().manual_seed(1))
    seq_idx = seq_idx.to(dev)
    q, k, v = (torch.randn(b, L, h, d, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(b, L, h, d, device=dev, dtype=torch.bfloat16)
    refs = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = attn.attention_ref(*refs, seq_idx=seq_idx)
    ref.backward(grad_out.float())
    flops = 3.5 * doc_flops
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: packed ({b}, {L}, {h} x {d}) fwd+bwd, "
          f"{int(seq_idx[:, -1].sum()) + b} documents", flush=True)

    def report(name, fn):
        for t in (q, k, v):
            t.grad = None
        fn().backward(grad_out)
        errs = [((t.grad.float() - r.grad).norm() / r.grad.norm()).item() for t, r in zip((q, k, v), refs)]
        ms = bench_ms(lambda: fn().backward(grad_out), grad_to_none=[q, k, v])
        print(f"{name:58s} {ms:7.4f} ms  {flops / ms / 1e9:6.1f} TFLOP/s on the documents  grad err "
              f"{max(errs):.1e}", flush=True)

    report("unpacked rows, our call (auto)", lambda: attn.attention(q, k, v))
    report("packed, our call (auto: FA2 varlen)", lambda: attn.attention(q, k, v, seq_idx=seq_idx))
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    doc = attn.document_ids(seq_idx)

    def mask_mod(bi, hi, qi, kj):
        return (kj <= qi) & (doc[bi, qi] == doc[bi, kj])

    from torch.nn.attention.flex_attention import create_block_mask
    for size, opts in ((128, None), (64, attn.FLEX_PACKED_FWD["kernel_options"])):
        bm = create_block_mask(mask_mod, b, None, L, L, device=dev, BLOCK_SIZE=size, _compile=True)
        mask_ms = bench_ms(lambda size=size: create_block_mask(mask_mod, b, None, L, L, device=dev, BLOCK_SIZE=size,
                                                               _compile=True))
        print(f"block mask of {size}-token blocks: {mask_ms:.3f} ms to make", flush=True)
        torch._dynamo.reset()
        fn = torch.compile(flex_attention)
        try:
            report(f"flex, mask blocks {size}, {opts or 'default'}",
                   lambda fn=fn, bm=bm, opts=opts: fn(qt, kt, vt, block_mask=bm, kernel_options=opts).transpose(1, 2))
        except Exception as exc:  # reported, not fatal
            print(f"flex {size} {opts}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)


if __name__ == "__main__":
    main()
