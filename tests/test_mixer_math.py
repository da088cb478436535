"""Each mixer and the model shell against a naive fp64 implementation written here from the papers' equations.

tests/test_kernel_refs.py checks the ops (scans, conv) against loops; this file checks what the mixers build around
them: the projections and their split, the conv's taps, Δ = softplus(dt_proj(·) + bias), A = -exp(A_log), the D
skip, the SiLU(z) gate, Mamba-2's grouped B/C and gated RMSNorm, GLA's logsigmoid/normalizer gate and its output
norm, attention's GQA, RoPE (transformers' Llama rotation as the oracle), causal mask and sliding window; then the
model: embedding, pre-norm residual blocks, SwiGLU, MoE routing and its aux loss, final norm and a tied head.
Every recurrence is a per-token loop; packed documents restart it.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

from zoo.registry import get_mixer

D_MODEL = 32
TOL = 1e-5  # fp32 references against fp64 loops; a wrong formula is off by order 1


def perturbed(mixer: torch.nn.Module) -> torch.nn.Module:
    """The mixer in fp64 with every parameter moved off its init (so a dropped bias or D shows)."""
    mixer = mixer.double()
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return mixer.eval()


def lin(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    return x @ layer.weight.T + (0 if layer.bias is None else layer.bias)


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def starts(seq_idx: torch.Tensor | None, T: int) -> list[int]:
    """Positions where a document starts (0 included) in a one-row seq_idx."""
    if seq_idx is None:
        return [0]
    s = seq_idx[0]
    return [0] + [t for t in range(1, T) if s[t] != s[t - 1]]


def conv_silu(x: torch.Tensor, conv: torch.nn.Conv1d, doc_start: torch.Tensor) -> torch.Tensor:
    """Causal depthwise conv + SiLU, x [T, C]: out_t = silu(b + Σ_k w[:, k] x_{t-K+1+k}), taps before the
    document's start (doc_start[t]) are zero."""
    T, K = x.shape[0], conv.weight.shape[-1]
    w = conv.weight[:, 0, :]  # (C, K)
    out = []
    for t in range(T):
        acc = torch.zeros_like(x[0]) if conv.bias is None else conv.bias.clone()
        for k in range(K):
            j = t - K + 1 + k
            if j >= doc_start[t]:
                acc = acc + w[:, k] * x[j]
        out.append(F.silu(acc))
    return torch.stack(out)


def doc_starts(seq_idx: torch.Tensor | None, T: int) -> torch.Tensor:
    first = starts(seq_idx, T)
    return torch.tensor([max(s for s in first if s <= t) for t in range(T)])


# ---- naive mixers (one row [T, d_model]) -------------------------------------------------------------------

def mamba_naive(m, x: torch.Tensor, seq_idx=None) -> torch.Tensor:
    """Gu & Dao, Alg. 2: x, z = in_proj; u = SiLU(conv(x)); Δ, B, C from u; h_t = exp(ΔA) h + Δ B u_t;
    y = C h + D u; y · SiLU(z) -> out_proj."""
    T = x.shape[0]
    xs, z = lin(x, m.in_proj).chunk(2, dim=-1)
    ds = doc_starts(seq_idx, T)
    u = conv_silu(xs, m.conv1d, ds)
    dt, B, C = torch.split(lin(u, m.x_proj), [m.dt_rank, m.d_state, m.d_state], dim=-1)
    if m.inner_norms:
        dt = rms(dt, m.dt_layernorm.weight, m.dt_layernorm.eps)
        B = rms(B, m.b_layernorm.weight, m.b_layernorm.eps)
        C = rms(C, m.c_layernorm.weight, m.c_layernorm.eps)
    delta = F.softplus(dt @ m.dt_proj.weight.T + m.dt_proj.bias)  # (T, d_inner)
    A = -torch.exp(m.A_log)  # (d_inner, N)
    h = torch.zeros_like(A)
    ys = []
    for t in range(T):
        if ds[t] == t:
            h = torch.zeros_like(A)
        h = torch.exp(delta[t, :, None] * A) * h + (delta[t] * u[t])[:, None] * B[t][None, :]
        ys.append(h @ C[t] + m.D * u[t])
    y = torch.stack(ys) * F.silu(z)
    return lin(y, m.out_proj)


def mamba2_naive(m, x: torch.Tensor, seq_idx=None) -> torch.Tensor:
    """Dao & Gu (SSD): z, xBC, dt = in_proj; xBC = SiLU(conv(xBC)); per head h (group h // (H/G)):
    h_t = exp(Δ_t A_h) h + Δ_t x_t B_tᵀ, y = h C_t + D_h x_t; out_proj(RMSNorm_groups(y · SiLU(z)))."""
    T = x.shape[0]
    H, P, G, N = m.n_heads, m.head_dim, m.n_groups, m.d_state
    z, xBC, dt = torch.split(lin(x, m.in_proj), [m.d_inner, m.conv_dim, H], dim=-1)
    ds = doc_starts(seq_idx, T)
    xBC = conv_silu(xBC, m.conv1d, ds)
    xs, B, C = torch.split(xBC, [m.d_inner, G * N, G * N], dim=-1)
    xs, B, C = xs.view(T, H, P), B.view(T, G, N), C.view(T, G, N)
    delta = F.softplus(dt + m.dt_bias)  # (T, H)
    A = -torch.exp(m.A_log)
    y = torch.zeros(T, H, P, dtype=x.dtype)
    for head in range(H):
        g = head // (H // G)
        h = torch.zeros(P, N, dtype=x.dtype)
        for t in range(T):
            if ds[t] == t:
                h = torch.zeros_like(h)
            h = torch.exp(delta[t, head] * A[head]) * h + delta[t, head] * xs[t, head][:, None] * B[t, g][None, :]
            y[t, head] = h @ C[t, g] + m.D[head] * xs[t, head]
    y = y.reshape(T, m.d_inner) * F.silu(z)
    size = m.norm.group_size
    y = torch.cat([rms(part, 1.0, m.norm.eps) for part in y.split(size, dim=-1)], dim=-1) * m.norm.weight
    return lin(y, m.out_proj)


def gla_naive(m, x: torch.Tensor, seq_idx=None) -> torch.Tensor:
    """Yang et al. (GLA): α_t = exp(logsigmoid(W2 W1 x_t + b) / normalizer); S_t = diag(α_t) S + k_tᵀ v_t;
    o_t = q_t S_t / sqrt(d_k); per head RMSNorm(o) · SiLU(g_proj x) -> o_proj."""
    T = x.shape[0]
    H, K, V = m.n_heads, m.head_k, m.head_v
    q, k = lin(x, m.q_proj).view(T, H, K), lin(x, m.k_proj).view(T, H, K)
    v, g = lin(x, m.v_proj).view(T, H, V), lin(x, m.g_proj).view(T, H, V)
    log_alpha = F.logsigmoid(lin(lin(x, m.gk_proj[0]), m.gk_proj[1])) / m.gate_logit_normalizer
    alpha = torch.exp(log_alpha).view(T, H, K)
    ds = doc_starts(seq_idx, T)
    S = torch.zeros(H, K, V, dtype=x.dtype)
    outs = []
    for t in range(T):
        if ds[t] == t:
            S = torch.zeros_like(S)
        S = alpha[t][..., None] * S + k[t][..., None] * v[t][:, None, :]
        outs.append(torch.einsum("hk,hkv->hv", q[t], S) / math.sqrt(K))
    o = rms(torch.stack(outs), m.g_norm.weight, m.g_norm.eps) * F.silu(g)
    return lin(o.reshape(T, H * V), m.o_proj)


def attention_naive(m, x: torch.Tensor, seq_idx=None) -> torch.Tensor:
    """Causal softmax attention, GQA (query head h reads KV head h // (H/Hkv), as transformers' repeat_kv),
    RoPE as transformers' Llama applies it (its own rotary embedding and apply_rotary_pos_emb), and a sliding
    window of w keys (the query's own included); packed documents see only themselves."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    T = x.shape[0]
    H, Hkv, Dh = m.n_heads, m.n_kv_heads, m.head_dim
    q = lin(x, m.q_proj).view(T, H, Dh).transpose(0, 1)[None]  # (1, H, T, Dh) as Llama holds it
    k = lin(x, m.k_proj).view(T, Hkv, Dh).transpose(0, 1)[None]
    v = lin(x, m.v_proj).view(T, Hkv, Dh).transpose(0, 1)
    if m.use_rope:
        config = LlamaConfig(hidden_size=H * Dh, num_attention_heads=H, head_dim=Dh, rope_theta=m.rope_theta,
                             max_position_embeddings=T)
        rotary = LlamaRotaryEmbedding(config).double()
        cos, sin = rotary(q, torch.arange(T)[None])
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
    q, k = q[0], k[0].repeat_interleave(H // Hkv, dim=0)
    v = v.repeat_interleave(H // Hkv, dim=0)
    scores = q @ k.transpose(-1, -2) / math.sqrt(Dh)  # (H, T, T)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    visible = (j <= i) & (j >= doc_starts(seq_idx, T)[:, None])
    if m.window:
        visible &= i - j < m.window
    o = scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v  # (H, T, Dh)
    return lin(o.transpose(0, 1).reshape(T, H * Dh), m.o_proj)


NAIVE = {"mamba": mamba_naive, "mamba2": mamba2_naive, "gla": gla_naive, "attention": attention_naive}
CASES = {
    "mamba": ("mamba", {"d_state": 8, "d_conv": 4, "expand": 2}),
    "mamba-bias-inner-norms": ("mamba", {"d_state": 4, "d_conv": 3, "expand": 1.5, "dt_rank": 5, "bias": True,
                                         "inner_norms": True}),
    "mamba2": ("mamba2", {"d_state": 8, "expand": 2, "head_dim": 16, "chunk_size": 4}),
    "mamba2-groups": ("mamba2", {"d_state": 4, "d_conv": 3, "expand": 2, "head_dim": 8, "n_groups": 2,
                                 "chunk_size": 4, "bias": True}),
    "mamba2-one-norm-group": ("mamba2", {"d_state": 4, "expand": 2, "head_dim": 8, "n_groups": 2,
                                         "norm_groups": 1, "chunk_size": 5}),
    "gla": ("gla", {"n_heads": 2, "chunk_size": 4}),
    "gla-widths": ("gla", {"n_heads": 4, "expand_k": 1.0, "expand_v": 0.5, "gate_low_rank_dim": 8,
                           "gate_logit_normalizer": 4.0, "chunk_size": 8}),
    "attention-gqa": ("attention", {"n_heads": 4, "n_kv_heads": 2, "rope_theta": 500.0}),
    "attention-window": ("attention", {"n_heads": 4, "n_kv_heads": 1, "window": 4}),
    "attention-headdim-norope": ("attention", {"n_heads": 2, "head_dim": 12, "rope": False}),
}


@pytest.mark.parametrize("packed", [False, True], ids=["one-document", "packed"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_mixer_equals_naive_equations(case, packed):
    kind, spec = CASES[case]
    mixer = perturbed(get_mixer(kind)(D_MODEL, 0, **spec))
    T = 13
    x = torch.randn(1, T, D_MODEL, dtype=torch.float64)
    seq_idx = torch.tensor([[0] * 5 + [1] * 6 + [2] * 2], dtype=torch.int32) if packed else None
    out = mixer(x, seq_idx=seq_idx)
    assert_close(case, out[0], NAIVE[kind](mixer, x[0], seq_idx), TOL)
    # decoding token by token (conv and recurrent states, KV cache) gives every position of the forward
    if not packed:
        cache = mixer.init_state(1, x.dtype, x.device)
        steps = torch.cat([mixer(x[:, t:t + 1], cache=cache) for t in range(T)], dim=1)
        assert_close(f"{case} steps", steps[0], NAIVE[kind](mixer, x[0]), TOL)


# ---- the model shell ---------------------------------------------------------------------------------------

def swiglu_naive(ffn, h: torch.Tensor) -> torch.Tensor:
    return lin(F.silu(lin(h, ffn.gate_proj)) * lin(h, ffn.up_proj), ffn.down_proj)


def moe_naive(moe, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k of a softmax router (renormalized when normalize_topk). Returns (output, the top-k assignments per
    expert, the router probabilities summed over tokens), the two sums the model's aux loss is made of."""
    probs = lin(h, moe.router).softmax(-1)  # (tokens, E)
    out = torch.zeros_like(h)
    counts = torch.zeros(moe.n_experts, dtype=h.dtype)
    for t in range(h.shape[0]):
        weights, chosen = probs[t].topk(moe.top_k)
        if moe.normalize_topk:
            weights = weights / weights.sum()
        for w, e in zip(weights, chosen.tolist()):
            out[t] += w * swiglu_naive(moe.experts[e], h[t])
            counts[e] += 1
    return out, counts, probs.sum(0)


def test_model_equals_naive_composition():
    """Embedding -> (x + mixer(RMSNorm(x)), x + ffn(RMSNorm(x))) per layer -> RMSNorm -> tied head; the loss is the
    mean next-token cross-entropy plus aux_loss_coef · aux, aux = E · Σ_e c_e p_e over every MoE layer's tokens at
    once (c_e: top-k assignments to expert e per token, p_e: e's mean probability; transformers' Jamba's)."""
    from zoo import ZooConfig, ZooForCausalLM
    from zoo.layers import MoE

    config = ZooConfig(vocab_size=61, d_model=D_MODEL, layers="MSAG", ffn={"type": "swiglu", "hidden": 48},
                       mixers={"M": {"type": "mamba", "d_state": 4}, "A": {"type": "attention", "n_heads": 4,
                                                                               "n_kv_heads": 2},
                               "S": {"type": "mamba2", "d_state": 4, "head_dim": 16, "chunk_size": 4},
                               "G": {"type": "gla", "n_heads": 2, "chunk_size": 4}},
                       moe={"every": 2, "n_experts": 4, "top_k": 2, "aux_loss_coef": 0.01})
    model = perturbed(ZooForCausalLM(config))
    ids = torch.randint(0, 61, (1, 11))
    out = model.train()(ids, labels=ids, use_cache=False)  # the aux loss joins the loss in training mode

    x = model.model.embeddings.weight[ids[0]]
    counts, probs, rows = 0, 0, 0
    for block in model.model.layers:
        x = x + NAIVE[block.mixer.mixer_type](block.mixer, rms(x, block.norm.weight, block.norm.eps))
        h = rms(x, block.ffn_norm.weight, block.ffn_norm.eps)
        if isinstance(block.ffn, MoE):
            h, c, p = moe_naive(block.ffn, h)
            counts, probs, rows = counts + c, probs + p, rows + h.shape[0]
        else:
            h = swiglu_naive(block.ffn, h)
        x = x + h
    x = rms(x, model.model.norm_f.weight, model.model.norm_f.eps)
    assert model.lm_head.weight is model.model.embeddings.weight  # tied by default
    logits = x @ model.model.embeddings.weight.T
    assert_close("logits", out.logits[0], logits, TOL)
    aux_total = 4 * ((counts / rows) * (probs / rows)).sum()
    assert_close("aux", out.aux_loss, aux_total, TOL)
    loss = F.cross_entropy(logits[:-1], ids[0, 1:]) + 0.01 * aux_total
    assert_close("loss", out.loss, loss, TOL)
