"""The Triton packed-attention forward (zoo_kernels.attention.varlen_triton) against attention_ref: under Triton's
interpreter on CPU (fp32, tiny sizes, blocks of 16-32 so that documents span query blocks, start and end inside
them, and a row ends inside one), and on a GPU (bf16/fp16, head dims 64/128/256, GQA, random packed rows, every
config, the autotuned launch, and the dispatch through `attention`)."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
import zoo_kernels.attention as attn
from helpers import rel_err, run_in_interpreter
from zoo_kernels.attention import BackendUnavailable, attention, attention_ref, visible_mask

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
TOL = {torch.bfloat16: 1.5e-2, torch.float16: 4e-3, torch.float32: 1e-5}  # output, as test_attention_cuda.py


def rows_from_starts(length: int, starts_per_row: list[list[int]], device="cpu") -> torch.Tensor:
    """seq_idx [B, L] int32 whose documents start at the given positions (ids increase by 3: not 0, 1, 2...)."""
    seq = torch.zeros(len(starts_per_row), length, dtype=torch.int32)
    for b, starts in enumerate(starts_per_row):
        for lo in starts[1:]:
            seq[b, lo:] += 3
    return seq.to(device)


def random_rows(batch: int, length: int, gen: torch.Generator, device) -> torch.Tensor:
    """4-8 documents per row at random cuts, plus a one-token document in row 0."""
    starts = []
    for _ in range(batch):
        n_docs = int(torch.randint(4, 9, (1,), generator=gen))
        starts.append([0, *sorted((torch.randperm(length - 1, generator=gen)[: n_docs - 1] + 1).tolist())])
    starts[0] = sorted({*starts[0], length // 2, length // 2 + 1})
    return rows_from_starts(length, starts, device)


def fused_qkv(batch, length, heads, kv_heads, dim, dtype, device, gen):
    """q [B, L, H, D], k, v [B, L, Hkv, D] as views of one projection output [B, L, (H + 2 Hkv) D]."""
    x = torch.randn(batch, length, (heads + 2 * kv_heads) * dim, device=device, generator=gen).to(dtype)
    q, k, v = x.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    return (q.unflatten(-1, (heads, dim)), k.unflatten(-1, (kv_heads, dim)), v.unflatten(-1, (kv_heads, dim)))


def lse_ref(q, k, seq_idx, scale):
    """log-sum-exp [B, H, L] of the visible scaled scores, fp32."""
    groups = q.shape[2] // k.shape[2]
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float().repeat_interleave(groups, 2)) * scale
    mask = visible_mask(q.shape[1], k.shape[1], seq_idx=seq_idx, device=q.device)[:, None]
    return scores.masked_fill(~mask, float("-inf")).logsumexp(-1)


# --- CPU


def test_doc_starts_and_their_cache():
    pytest.importorskip("triton")
    from zoo_kernels.attention.varlen_triton import doc_starts

    seq = rows_from_starts(12, [[0, 1, 2, 7], [0]])
    seq[1, :] = 5
    want = torch.tensor([[0, 1, 2, 2, 2, 2, 2, 7, 7, 7, 7, 7], [0] * 12], dtype=torch.int32)
    got = doc_starts(seq)
    assert got.dtype == torch.int32 and torch.equal(got, want)
    assert doc_starts(seq) is got, "the same seq_idx tensor reuses its doc starts"
    seq[1, 6:] = 2  # in place: the version changes, the starts are recomputed
    assert doc_starts(seq)[1].tolist() == [0] * 6 + [6] * 6
    with torch.inference_mode():  # no version counter: computed, not cached
        seq = rows_from_starts(12, [[0, 5]])
        assert doc_starts(seq).tolist() == [[0] * 5 + [5] * 7]
        seq[0, 3:] = 1
        assert doc_starts(seq).tolist() == [[0] * 3 + [3] * 9]


def test_config_pruning_by_shared_memory():
    pytest.importorskip("triton")
    from zoo_kernels.attention import varlen_triton as vt

    for dim in vt.HEAD_DIMS:
        fitting = vt.configs_for(dim)
        assert fitting and all(vt.smem_bytes(c, dim) <= vt._SMEM_BYTES for c in fitting), dim
        pruned = vt._prune(vt._packed_fwd_tuned.configs, {"q_ptr": torch.empty(1, dtype=torch.bfloat16)},
                           HEAD_DIM=dim, IEEE=False, RETURN_LSE=False)
        assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in pruned] == \
            [(c["BLOCK_M"], c["BLOCK_N"], c["num_warps"], c["num_stages"]) for c in fitting], dim
    assert len(vt.CONFIGS) <= 8 and len(vt.configs_for(128)) == 8 and len(vt.configs_for(256)) == 3


def test_packed_kernel_rejects_what_it_cannot_run():
    pytest.importorskip("triton")
    from zoo_kernels.attention.varlen_triton import HEAD_DIMS, packed_attention_fwd

    assert HEAD_DIMS == attn.TRITON_PACKED_HEAD_DIMS
    seq = torch.zeros(1, 8, dtype=torch.int32)
    q = torch.randn(1, 8, 2, 48)
    with pytest.raises(ValueError, match="head_dim"):
        packed_attention_fwd(q, q, q, seq)
    q = torch.randn(1, 8, 2, 64)
    with pytest.raises(ValueError, match="H % Hkv"):
        packed_attention_fwd(q, q[:, :, :1].expand(1, 8, 3, 64), q[:, :, :1].expand(1, 8, 3, 64), seq)
    with pytest.raises(ValueError, match="unit stride"):
        packed_attention_fwd(q, q, torch.randn(1, 8, 64, 2).transpose(-1, -2), seq)
    with pytest.raises(ValueError, match="seq_idx"):
        packed_attention_fwd(q, q, q, seq[:, :4])


def compile_for_sm90(dim: int, config: dict):
    """The kernel compiled ahead of time for sm90 in bf16 (no GPU needed: Triton's own ptxas), strides and
    pointers 16-divisible as a launch on a projection output gets them."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from zoo_kernels.attention import varlen_triton as vt

    fn = vt._packed_fwd_kernel
    values = dict(HEAD_DIM=dim, IEEE=False, RETURN_LSE=False, BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"])
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            signature[p.name], constexprs[(i,)] = "constexpr", values[p.name]
        elif p.name.endswith("_ptr"):
            signature[p.name] = {"ds_ptr": "*i32", "lse_ptr": "*fp32"}.get(p.name, "*bf16")
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[p.name] = "fp32" if p.name == "qk_scale" else "i32"
            if p.name.startswith("s_"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=config["num_warps"], num_stages=config["num_stages"]))


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize("dim", [64, 128, 256])
def test_default_config_compiles_for_sm90_without_spilling(dim):
    """What a CPU can check of the Hopper build: wgmma, the shared memory estimate, no register spills."""
    triton = pytest.importorskip("triton")
    from zoo_kernels.attention import varlen_triton as vt

    config = vt.configs_for(dim)[0]
    try:
        kernel = compile_for_sm90(dim, config)
    except (ImportError, RuntimeError) as e:  # no ptxas for sm90 in this Triton install
        pytest.skip(f"cannot compile for sm90 here: {e}")
    assert "wgmma.mma_async" in kernel.asm["ptx"]
    assert kernel.metadata.shared == vt.smem_bytes(config, dim)
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if cuobjdump.exists():
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            usage = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True).stdout
        assert "STACK:0" in usage, usage  # a stack frame here means spilled registers


def test_packed_kernel_in_the_interpreter():
    pytest.importorskip("triton")
    run_in_interpreter(__file__)


def _interpreter_main() -> None:
    from zoo_kernels.attention.varlen_triton import configs_for, packed_attention_fwd

    def check(name, q, k, v, seq, config, scale=None, lse=False):
        out = packed_attention_fwd(q, k, v, seq, scale, return_lse=lse, config=config)
        o, l = out if lse else (out, None)
        ref = attention_ref(q, k, v, seq_idx=seq, scale=scale)
        assert o.shape == q.shape and o.dtype == q.dtype, name
        assert rel_err(o, ref) < 1e-5, (name, rel_err(o, ref))
        if lse:
            want = lse_ref(q, k, seq, q.shape[-1] ** -0.5 if scale is None else scale)
            assert (l - want).abs().max() < 1e-4, (name, (l - want).abs().max())
        print(f"interpreter: {name} matches the reference ({rel_err(o, ref):.1e})")

    gen = torch.Generator().manual_seed(0)

    def block(m, n):
        return dict(BLOCK_M=m, BLOCK_N=n, num_warps=4, num_stages=1)

    # L = 45 (not a multiple of any block); row 0: one-token documents at 0 and 1, one spanning query blocks from
    # 2, others starting mid-block at 20 and 40; row 1: a document over two blocks, another from 33
    seq = rows_from_starts(45, [[0, 1, 2, 20, 40], [0, 33]])
    q, k, v = fused_qkv(2, 45, 4, 2, 32, torch.float32, "cpu", gen)
    check("D32 GQA blocks 16x16 + lse", q, k, v, seq, block(16, 16), lse=True)
    check("D32 GQA blocks 32x16", q, k, v, seq, block(32, 16))
    check("D32 GQA blocks 16x32, scale 0.3", q, k, v, seq, block(16, 32), scale=0.3)
    check("D32 default config (one block)", q, k, v, seq, configs_for(32)[0])
    # keys of row 1's first document score ~50x larger: a later document's queries must not keep that maximum
    k_loud = k.clone()
    k_loud[1, :33] *= 50
    check("D32 loud earlier document, blocks 16x16", q, k_loud, v, seq, block(16, 16))
    # D = 64: every token its own document; one document over a whole row of 37
    seq = rows_from_starts(37, [list(range(37)), [0]])
    q, k, v = (torch.randn(2, 37, h, 64, generator=gen) for h in (4, 2, 2))
    check("D64 GQA one-token documents / one document, blocks 16x16", q, k, v, seq, block(16, 16))


# --- CUDA


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("dim", [64, 128, 256])
@pytest.mark.parametrize("batch,length,heads,kv_heads", [(2, 2048, 8, 2), (3, 1000, 4, 4)],
                         ids=["L2048-gqa", "L1000"])
def test_packed_kernel_matches_reference_cuda(monkeypatch, dtype, dim, batch, length, heads, kv_heads):
    from zoo_kernels.attention import varlen_triton

    monkeypatch.setenv(varlen_triton.AUTOTUNE_ENV, "0")  # the first fitting config; test_every_config: the rest
    gen = torch.Generator(device="cuda").manual_seed(dim + length)
    q, k, v = fused_qkv(batch, length, heads, kv_heads, dim, dtype, "cuda", gen)
    seq = random_rows(batch, length, torch.Generator().manual_seed(length), "cuda")
    o = varlen_triton.packed_attention_fwd(q, k, v, seq)
    ref = attention_ref(q, k, v, seq_idx=seq)
    assert o.dtype == dtype and o.shape == q.shape and torch.isfinite(o).all()
    assert rel_err(o, ref) < TOL[dtype], rel_err(o, ref)


def _config_params():
    from_configs = []
    try:
        from zoo_kernels.attention.varlen_triton import CONFIGS, configs_for
    except ImportError:
        return [pytest.param(None, None, None, marks=pytest.mark.skip(reason="needs triton"))]
    for dtype, dim in ((torch.bfloat16, 128), (torch.float16, 64)):
        for i, c in enumerate(CONFIGS):
            if c in configs_for(dim):
                from_configs.append(pytest.param(dtype, dim, c, id=f"{str(dtype)[6:]}-d{dim}-config{i}"))
    return from_configs


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype,dim,config", _config_params())
def test_every_config_matches_reference_cuda(dtype, dim, config):
    from zoo_kernels.attention.varlen_triton import packed_attention_fwd

    gen = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = fused_qkv(2, 999, 8, 2, dim, dtype, "cuda", gen)
    seq = random_rows(2, 999, torch.Generator().manual_seed(2), "cuda")
    o, lse = packed_attention_fwd(q, k, v, seq, return_lse=True, config=config)
    ref = attention_ref(q, k, v, seq_idx=seq)
    assert rel_err(o, ref) < TOL[dtype], rel_err(o, ref)
    assert (lse - lse_ref(q, k, seq, dim**-0.5)).abs().max() < 2e-2


@pytest.mark.cuda
@cuda
def test_autotuned_launch_cuda(monkeypatch):
    from zoo_kernels.attention import varlen_triton

    monkeypatch.setenv(varlen_triton.AUTOTUNE_ENV, "1")
    gen = torch.Generator(device="cuda").manual_seed(3)
    q, k, v = fused_qkv(2, 2048, 16, 16, 128, torch.bfloat16, "cuda", gen)
    seq = random_rows(2, 2048, torch.Generator().manual_seed(3), "cuda")
    o = varlen_triton.packed_attention_fwd(q, k, v, seq)
    print("autotuned config:", varlen_triton._packed_fwd_tuned.best_config)
    assert rel_err(o, attention_ref(q, k, v, seq_idx=seq)) < TOL[torch.bfloat16]


@pytest.mark.cuda
@cuda
def test_attention_takes_it_for_no_grad_packed_calls_cuda(monkeypatch):
    from zoo_kernels.attention import varlen_triton

    monkeypatch.setenv(varlen_triton.AUTOTUNE_ENV, "0")
    monkeypatch.setattr(attn, "PACKED_TRITON", True)
    calls = []
    kernel = varlen_triton.packed_attention_fwd
    monkeypatch.setattr(varlen_triton, "packed_attention_fwd", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    gen = torch.Generator(device="cuda").manual_seed(4)
    q, k, v = (t.requires_grad_() for t in (torch.randn(2, 500, h, 64, device="cuda", generator=gen)
                                            .to(torch.bfloat16) for h in (8, 2, 2)))
    seq = random_rows(2, 500, torch.Generator().manual_seed(4), "cuda")
    ref = attention_ref(q.detach(), k.detach(), v.detach(), seq_idx=seq)
    with torch.no_grad():
        assert rel_err(attention(q, k, v, seq_idx=seq), ref) < TOL[torch.bfloat16]
    assert len(calls) == 1
    with torch.inference_mode():
        attention(q, k, v, seq_idx=seq)
    assert len(calls) == 2
    out = attention(q, k, v, seq_idx=seq)  # needs a gradient: the usual packed backend
    assert len(calls) == 2 and out.requires_grad and rel_err(out, ref) < TOL[torch.bfloat16]
    out.float().sum().backward()
    with torch.no_grad():
        attention(q, k, v, seq_idx=seq, window=64)  # a window: not ours
        attention(q, k, v)  # not packed
    assert len(calls) == 2
    with pytest.raises(BackendUnavailable, match="no backward"):
        attention(q, k, v, seq_idx=seq, backend="triton_packed")
    with torch.no_grad(), pytest.raises(BackendUnavailable, match="packed rows only"):
        attention(q, k, v, backend="triton_packed")


if __name__ == "__main__":
    _interpreter_main()
