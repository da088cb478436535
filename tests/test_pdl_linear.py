"""The PDL decode projection (zoo_kernels.pdl_linear): y = x Wᵀ (+ b) for <= 64 rows, the weight loaded before the
kernel waits for the previous one.

- CPU: the reference is F.linear in fp32; `supported` is False off CUDA and for what the kernel does not take
  (dtype, rows, K % 32, N % 16, layouts), and `pdl_linear` says why with a ValueError before it touches a device;
  the tiling choice is legal for every shape; the sources ship with the package.
- CUDA (compute capability 9.0+): the kernel against the fp32 reference for M in {1, 3, 8, 16, 33, 64}, six (K, N),
  bf16/fp16, with and without bias; strided and misaligned rows, leading dimensions, every tiling (multi-chunk K, idle
  cluster ranks); the same bits with PDL off and with the early trigger; inside CUDA graph capture; and a chain of 20
  dependent projections (with elementwise ops between some) captured in a graph, each step against the reference of
  its own input, and bit for bit the chain launched without PDL.
"""

from __future__ import annotations

import itertools
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import ROOT, assert_close
from zoo_kernels import pdl_linear as pl

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
TOL = {torch.bfloat16: 8e-3, torch.float16: 1.5e-3}  # relative error of a result rounded to the dtype
ROWS = (1, 3, 8, 16, 33, 64)
SHAPES = ((768, 3072), (1536, 768), (768, 2048), (2048, 768), (4096, 1024), (64, 16))  # (K, N)

needs_hopper = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
    reason="needs an NVIDIA GPU with compute capability 9.0+ (programmatic dependent launch, clusters)")


def _weights(K, N, dtype, device, bias=True, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(device=device, dtype=dtype)
    b = torch.randn(N, generator=g).to(device=device, dtype=dtype) if bias else None
    if w.is_cuda:
        torch.cuda.synchronize()  # the kernel reads the weight before its wait: not right after the kernel writing it
    return w, b


def _x(M, K, dtype, device, seed=1):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(M, K, generator=g).to(device=device, dtype=dtype)


# ---------------------------------------------------------------- CPU


def test_reference_is_f_linear_in_fp32():
    w, b = _weights(64, 32, torch.bfloat16, "cpu")
    x = _x(5, 64, torch.bfloat16, "cpu")
    ref = F.linear(x.float(), w.float(), b.float()).to(torch.bfloat16)
    assert torch.equal(pl.pdl_linear_ref(x, w, b), ref)
    assert pl.pdl_linear_ref(x[None], w).shape == (1, 5, 32)


def _bad_cases():
    w, b = _weights(64, 32, torch.bfloat16, "cpu")
    x = _x(4, 64, torch.bfloat16, "cpu")
    w48, _ = _weights(48, 32, torch.bfloat16, "cpu")
    w24, _ = _weights(64, 24, torch.bfloat16, "cpu")
    return {
        "fp32": ((x.float(), w.float(), None), "bf16 or fp16"),
        "weight_dtype": ((x, w.half(), None), "dtype"),
        "bias_dtype": ((x, w, b.half()), "dtype"),
        "too_many_rows": ((_x(65, 64, torch.bfloat16, "cpu"), w, None), "at most 64"),
        "rows_of_3d": ((_x(65, 64, torch.bfloat16, "cpu").view(5, 13, 64), w, None), "at most 64"),
        "k_not_32": ((_x(4, 48, torch.bfloat16, "cpu"), w48, None), "multiple of 32"),
        "n_not_16": ((x, w24, None), "multiple of 16"),
        "k_mismatch": ((_x(4, 96, torch.bfloat16, "cpu"), w, None), "does not match"),
        "weight_transposed": ((_x(4, 32, torch.bfloat16, "cpu"), w.t(), None), "contiguous"),
        "weight_strided": ((x, torch.empty(32, 128, dtype=torch.bfloat16)[:, :64], None), "contiguous"),
        "bias_shape": ((x, w, b[:16]), "bias"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_shapes_it_does_not_take_raise_before_any_device(case):
    (x, w, b), words = _bad_cases()[case]
    assert not pl.supported(x, w, b)
    with pytest.raises(ValueError, match=words):
        pl.pdl_linear(x, w, b)


@pytest.mark.parametrize("config", ((3, 1), (1, 3), (2, 1), (4, 1)), ids=("tiles3", "cluster3", "N48t2", "N48t4"))
def test_tilings_it_cannot_take_raise_before_the_extension(config, monkeypatch):
    """Every argument is checked in Python: the extension's own checks are a backstop that, on the GPU machine's
    image, crashed the process when their message formatted a number (thirteenth session)."""
    x, w = torch.zeros(2, 64, dtype=torch.bfloat16), torch.zeros(48, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="config"):
        pl.pdl_linear(x, w, config=config)
    monkeypatch.setenv("ZOO_PDL_LINEAR_CONFIG", ",".join(map(str, config)))
    with pytest.raises(ValueError, match="(?i)config"):
        pl.pdl_linear(x, w)


def test_not_supported_off_cuda():
    w, b = _weights(64, 32, torch.bfloat16, "cpu")
    x = _x(4, 64, torch.bfloat16, "cpu")
    assert pl._problem(x, w, b) is None  # the shapes are fine: only the device is not
    assert not pl.supported(x, w, b)
    with pytest.raises(RuntimeError, match="CUDA"):
        pl.pdl_linear(x, w, b)
    if not torch.cuda.is_available():
        assert not pl.available() and "no CUDA device" in pl.why_unavailable()


@pytest.mark.parametrize("sms", (132, 78, 16))
def test_tiling_is_legal_and_fills_the_sms(sms):
    shapes = SHAPES + ((1536, 80), (768, 2304), (768, 4096), (768, 50272), (96, 32))
    for (K, N), M in ((s, m) for s in shapes for m in ROWS):
        tiles, cluster = pl._config_for(N, sms, K, M)
        assert tiles in pl.FEATURE_TILES and cluster in pl.CLUSTERS
        assert N % (16 * tiles) == 0 and cluster <= K // 32, (K, N, M, tiles, cluster)
        ctas = N // (16 * tiles) * cluster
        fewest = min(N // (16 * t) for t in pl.FEATURE_TILES if N % (16 * t) == 0)
        if fewest <= sms:  # some tiling has at most one CTA per SM: the one chosen does too
            assert ctas <= sms, (K, N, M, tiles, cluster)
    # the tilings the H200's sweep found fastest (one CTA per SM at most, the fewest features per CTA, no cluster)
    assert pl._config_for(3072, 132) == (2, 1)  # Mamba-130M in_proj: 96 CTAs of 32 features
    assert pl._config_for(768, 132) == (1, 1)  # out_proj: 48 CTAs of 16 features
    assert pl._config_for(4096, 132) == (2, 1)  # a SwiGLU gate_up: 128 CTAs
    # past 16 rows a CTA's K range fits one chunk (its whole weight loaded before the wait) where a tiling allows it
    assert pl._config_for(3072, 132, 768, 64) == (2, 1)  # in_proj: 24 blocks of K, 4 k groups of 6
    assert pl._config_for(768, 132, 1536, 64) == (1, 2)  # out_proj: 48 blocks, a chunk of 24 at 8 k groups
    assert pl._config_for(768, 132, 1536, 32) == (1, 1)  # at 32 rows a chunk takes 48
    for (K, N), M in ((s, m) for s in shapes for m in (17, 32, 33, 64)):
        tiles, cluster = pl._config_for(N, sms, K, M)
        fits = [(t, c) for c in pl.CLUSTERS for t in pl.FEATURE_TILES if N % (16 * t) == 0
                and N // (16 * t) * c <= sms and -(-K // 32 // c) <= pl._chunk_blocks(M, t)]
        if fits:
            assert (tiles, cluster) == fits[0] and -(-K // 32 // cluster) <= pl._chunk_blocks(M, tiles)


def test_sources_ship_with_the_package():
    """The JIT build compiles csrc/ from the installed package: pyproject's package data must take it."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert any(fnmatch("zoo_kernels.pdl_linear", pattern) for pattern in config["packages"]["find"]["include"])
    globs = config["package-data"]["zoo_kernels"]
    package = Path(pl.__file__).parent
    for name in pl._SOURCES + pl._HEADERS:
        path = package / "csrc" / name
        assert path.is_file(), path
        relative = str(path.relative_to(package.parent))
        assert any(fnmatch(relative, glob) for glob in globs), relative


# ---------------------------------------------------------------- CUDA


@pytest.mark.cuda
@needs_hopper
@pytest.mark.parametrize("has_bias", (True, False), ids=("bias", "nobias"))
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("K,N", SHAPES, ids=[f"{k}x{n}" for k, n in SHAPES])
@pytest.mark.parametrize("M", ROWS)
def test_matches_reference(M, K, N, dtype, has_bias):
    w, b = _weights(K, N, dtype, "cuda", has_bias)
    x = _x(M, K, dtype, "cuda")
    assert pl.supported(x, w, b), pl.why_unavailable()
    out = pl.pdl_linear(x, w, b)
    assert out.dtype == dtype and out.is_contiguous()
    assert_close(f"M={M} K={K} N={N}", out, pl.pdl_linear_ref(x.float(), w.float(), b), TOL[dtype])


@pytest.mark.cuda
@needs_hopper
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_strided_misaligned_and_leading_dims(dtype):
    K, N = 768, 1536
    w, b = _weights(K, N, dtype, "cuda")
    wide = _x(33, K + 64, dtype, "cuda")
    x = wide[:, 32:32 + K]  # a column slice: row stride K + 64, 16-byte aligned
    assert pl.supported(x, w, b)
    assert_close("slice", pl.pdl_linear(x, w, b), pl.pdl_linear_ref(x.float(), w.float(), b), TOL[dtype])
    odd = wide[:, 3:3 + K]  # not 16-byte aligned: not supported as it lies, copied by pdl_linear
    assert not pl.supported(odd, w, b)
    assert_close("misaligned", pl.pdl_linear(odd, w, b), pl.pdl_linear_ref(odd.float(), w.float(), b), TOL[dtype])
    assert not pl.supported(x, w.detach().requires_grad_(), b)  # forward only: not where autograd would need it
    with torch.no_grad():
        assert pl.supported(x, w.detach().requires_grad_(), b)
    x3 = _x(8, K, dtype, "cuda").view(8, 1, K)
    out = pl.pdl_linear(x3, w, b)
    assert out.shape == (8, 1, N)
    assert_close("3d", out, pl.pdl_linear_ref(x3.float(), w.float(), b), TOL[dtype])
    assert pl.pdl_linear(x[:0], w, b).shape == (0, N)


@pytest.mark.cuda
@needs_hopper
@pytest.mark.parametrize("K,N", ((4096, 128), (768, 256), (96, 32)), ids=("multichunk", "130m", "idle_ranks"))
@pytest.mark.parametrize("M", (5, 64))
def test_every_tiling(M, K, N):
    """Every (feature_tiles, cluster): K longer than a chunk (later chunks' weights loaded after the wait), and
    clusters with more CTAs than 32-wide blocks of K (ranks without work)."""
    w, b = _weights(K, N, torch.bfloat16, "cuda")
    x = _x(M, K, torch.bfloat16, "cuda")
    ref = pl.pdl_linear_ref(x.float(), w.float(), b)
    for tiles in pl.FEATURE_TILES:
        if N % (16 * tiles):
            continue
        for cluster in pl.CLUSTERS:
            out = pl.pdl_linear(x, w, b, config=(tiles, cluster))
            assert_close(f"tiles={tiles} cluster={cluster}", out, ref, TOL[torch.bfloat16])


@pytest.mark.cuda
@needs_hopper
def test_python_chunk_rule_mirrors_the_kernel():
    """The tiling rule's _chunk_blocks mirrors the kernel's chunk: the shared memory the extension asks for is x's
    chunk (rows x padded pitch) or the k groups' partial sums, whichever is larger."""
    for M, K, tiles, cluster in itertools.product((1, 8, 9, 16, 17, 32, 33, 64), (64, 768, 1536, 2048, 4096),
                                                  pl.FEATURE_TILES, pl.CLUSTERS):
        rows = 8 * (1 if M <= 8 else 2 if M <= 16 else 4 if M <= 32 else 8)
        blocks = min(-(-K // 32 // cluster), pl._chunk_blocks(M, tiles))
        pitch = 32 * blocks + (32 if blocks % 2 == 0 else 0)
        expect = max(rows * pitch * 2, (8 // tiles) * rows * (16 * tiles + 4) * 4)
        assert pl._module().smem_bytes(M, K, tiles, cluster) == expect, (M, K, tiles, cluster)


@pytest.mark.cuda
@needs_hopper
def test_same_bits_without_pdl_and_with_the_early_trigger(monkeypatch):
    w, b = _weights(1536, 768, torch.bfloat16, "cuda")
    x = _x(64, 1536, torch.bfloat16, "cuda")
    out = pl.pdl_linear(x, w, b)
    assert torch.equal(pl.pdl_linear(x, w, b), out)  # fixed order of the fp32 sums
    monkeypatch.setenv("ZOO_PDL_LINEAR_PDL", "0")
    assert torch.equal(pl.pdl_linear(x, w, b), out)
    monkeypatch.setenv("ZOO_PDL_LINEAR_PDL", "1")
    monkeypatch.setenv("ZOO_PDL_LINEAR_TRIGGER", "early")
    assert torch.equal(pl.pdl_linear(x, w, b), out)


@pytest.mark.cuda
@needs_hopper
def test_inside_cuda_graph_capture():
    K, N = 768, 3072
    w, b = _weights(K, N, torch.bfloat16, "cuda")
    x = _x(16, K, torch.bfloat16, "cuda")
    pl.pdl_linear(x, w, b)  # build and warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = pl.pdl_linear(x, w, b)
    for seed in (2, 3):
        x.copy_(_x(16, K, torch.bfloat16, "cuda", seed=seed))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(f"replay {seed}", y, pl.pdl_linear_ref(x.float(), w.float(), b), TOL[torch.bfloat16])


def _chain(x, layers):
    """20 dependent projections, 768 -> 1536 -> 768 -> ..., an elementwise op after every third; returns every
    step's input and output."""
    ins, outs = [], []
    h = x
    for i, (w, b) in enumerate(layers):
        ins.append(h)
        h = pl.pdl_linear(h, w, b)
        outs.append(h)
        if i % 3 == 2:
            h = F.silu(h)
    return ins, outs


@pytest.mark.cuda
@needs_hopper
@pytest.mark.parametrize("M", (3, 64))
def test_chain_in_cuda_graph(M, monkeypatch):
    """Back-to-back dependents (each may start before the one it reads has finished) give, step by step, the
    reference of their own inputs, and the same bits as the chain without PDL."""
    dtype = torch.bfloat16
    layers = [_weights(768 if i % 2 == 0 else 1536, 1536 if i % 2 == 0 else 768, dtype, "cuda", bias=i % 4 != 1,
                       seed=10 + i) for i in range(20)]
    x = _x(M, 768, dtype, "cuda")
    results = {}
    for pdl in ("1", "0"):
        monkeypatch.setenv("ZOO_PDL_LINEAR_PDL", pdl)
        _chain(x, layers)  # warm up outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            ins, outs = _chain(x, layers)
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        for i, ((w, b), h, y) in enumerate(zip(layers, ins, outs)):
            assert_close(f"pdl={pdl} step {i}", y, pl.pdl_linear_ref(h.float(), w.float(), b), TOL[dtype])
        results[pdl] = [y.clone() for y in outs]
    eager = _chain(x, layers)[1]
    for i, (a, c, e) in enumerate(zip(results["1"], results["0"], eager)):
        assert torch.equal(a, c) and torch.equal(a, e), f"step {i} differs with and without PDL"
