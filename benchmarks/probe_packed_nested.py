"""Probe: packed causal attention through torch's jagged nested tensors (cuDNN, flash, efficient) vs FA2 varlen.

The packed rows of benchmarks/attention.py (B=8, L=2048, 16 heads x 128, 4-8 random documents per row, same
seed): checks each nested-tensor SDPA kernel's output and gradients against FA2 varlen
(`aten._flash_attention_forward` with cu_seqlens, what `zoo_kernels.attention.attention` runs for packed rows),
then times them all, and the unpacked cuDNN call at equal tokens. Findings: benchmarks/NOTES_attention.md
("Packed rows through nested tensors").

    python benchmarks/probe_packed_nested.py
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

B, L, H, D = 8, 2048, 16, 128


def document_lengths() -> list[int]:
    gen = torch.Generator().manual_seed(1)  # benchmarks/attention.py's cuts
    lengths = []
    for _ in range(B):
        n_docs = int(torch.randint(4, 9, (1,), generator=gen))
        cuts = sorted((torch.randperm(L - 1, generator=gen)[: n_docs - 1] + 1).tolist())
        lengths += [y - x for x, y in zip([0, *cuts], [*cuts, L])]
    return lengths


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    if not torch.cuda.is_available():
        sys.exit("probe_packed_nested.py needs a CUDA GPU")
    lengths = document_lengths()
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    longest = max(lengths)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: {len(lengths)} documents, longest {longest}")
    q, k, v = (torch.randn(B * L, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(B * L, H, D, device="cuda", dtype=torch.bfloat16)

    def fa2_varlen():
        return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, longest, longest, 0.0, True, False)[0]

    def nested(kind):
        def run():
            qs, ks, vs = (torch.nested.nested_tensor_from_jagged(t, cu.long(), max_seqlen=longest,
                                                                 min_seqlen=min(lengths)).transpose(1, 2)
                          for t in (q, k, v))
            with sdpa_kernel(kind):
                out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
            return out.transpose(1, 2).values()
        return run

    def unpacked_cudnn():
        qt, kt, vt = (t.view(B, L, H, D).transpose(1, 2) for t in (q, k, v))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True).transpose(1, 2)

    def outputs_and_grads(fn):
        for t in (q, k, v):
            t.grad = None
        out = fn()
        out.backward(grad_out.view_as(out))
        return [out.detach().float().flatten()] + [t.grad.float().flatten().clone() for t in (q, k, v)]

    candidates = {f"nested_{kind.name.lower()}": nested(kind) for kind in
                  (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)}
    want = outputs_and_grads(fa2_varlen)
    for name, fn in candidates.items():
        try:
            got = outputs_and_grads(fn)
        except Exception as e:  # noqa: BLE001 - a kernel refusing the layout is a finding, not a crash
            print(f"{name}: failed, {type(e).__name__}: {str(e)[:300]}")
            continue
        errs = [((a - b).norm() / b.norm()).item() for a, b in zip(got, want)]
        print(f"{name}: relative error vs FA2 varlen: out {errs[0]:.1e} dq {errs[1]:.1e} dk {errs[2]:.1e} "
              f"dv {errs[3]:.1e}")

    def time_ms(fn, backward: bool) -> float:
        if not backward:
            with torch.no_grad():
                return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")

        def step():
            out = fn()
            out.backward(grad_out.view_as(out))
        return triton.testing.do_bench(step, warmup=25, rep=200, grad_to_none=[q, k, v], return_mode="median")

    for name, fn in {"fa2_varlen": fa2_varlen, "unpacked_cudnn": unpacked_cudnn, **candidates}.items():
        for backward in (False, True):
            try:
                print(f"{name} {'fwd+bwd' if backward else 'fwd'}: {time_ms(fn, backward):.4f} ms")
            except Exception as e:  # noqa: BLE001
                print(f"{name} {'fwd+bwd' if backward else 'fwd'}: failed, {type(e).__name__}: {str(e)[:200]}")


if __name__ == "__main__":
    main()
