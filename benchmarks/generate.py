"""Benchmark: greedy decode throughput and memory of the 130M models, batch 1..64 after a 2K-token prompt.

Models (random weights, bf16, on one GPU): the zoo's configs/models/{mamba,mamba2,transformerpp,gla,jamba}-130m.yaml
and, in the same run, transformers' MambaForCausalLM (24 x 768, d_state 16) and LlamaForCausalLM (12 x 768, 12
heads, SwiGLU 2048, tied embeddings) of the same sizes (vocabulary 50280). For every batch size the prompt
(random tokens, seeded) is prefilled in one forward keeping only the last logits, then --new-tokens tokens are
decoded greedily by the same loop for every model (zoo.decode: the argmax token is fed back on the device, no
host sync per step); the decode is timed with CUDA events after --warmup steps. Every zoo model is also decoded
with the step captured in a CUDA graph (zoo.decode.GraphDecoder): recurrent states in static buffers, attention
layers (transformerpp, jamba) in static KV buffers with room for prompt + warmup + new tokens; both timings are
recorded and `ours_ms` takes the faster (`mode` says which). transformers' baselines decode eagerly.

Rows (benchmarks/results.jsonl), one per (model, batch), named generate/<model>/B<batch> (and /P<prompt> when
the prompt is not 2048 tokens): ours_ms = ms per decode step of the whole batch,
tokens_per_s = batch / step time, prefill_ms (a second prefill: the first, prefill_first_ms, pays builds and
autotuning), decode_peak_gib (torch.cuda.max_memory_allocated over the eager
decode, the weights included; with --graph only, over one eager step), graph_peak_gib (the same over the CUDA-graph
decode: the weights, its static caches and the graph's live buffers; not the intermediates the graph's private
pool keeps reserved but not allocated), cache_mib (bytes held by the cache after the
decode), floor_ms = (weight bytes + cache
bytes read, and written for recurrent states: every recurrent layer's, a hybrid's included, in the dtype the
steps keep them in; decode_traffic) / the
copy bandwidth measured at start-up
(benchmarks/ceilings.py). Baselines measured in the same run: zoo mamba ->
transformers' Mamba, zoo transformerpp -> transformers' Llama, zoo mamba2 / gla / jamba -> zoo transformerpp
(the 5x target at batch 64); ratio = baseline_ms / ours_ms (> 1: ours decodes faster). Every zoo row also has
vs_transformerpp = transformerpp ms / ours ms at the same batch (each one's faster mode: transformerpp_mode names
Transformer++'s, and a note says where the two modes differ); vs_transformerpp_graph compares the graph steps.

    python benchmarks/generate.py                                  # everything (about 5 minutes on an H100)
    python benchmarks/generate.py --models mamba hf-mamba --batches 1,64 --new-tokens 64
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import shlex
import sys
from pathlib import Path

import torch
from ceilings import floor_ms  # benchmarks/ceilings.py (the script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from zoo.cache import RecurrentLayer, ZooCache  # noqa: E402
from zoo.decode import EagerDecoder, GraphDecoder, cache_nbytes, graphable, prefill  # noqa: E402
from zoo.eval.common import non_negative_int, number_list, positive_int, sigterm_interrupts  # noqa: E402

VOCAB = 50280
ZOO = ("mamba", "mamba2", "transformerpp", "gla", "jamba")
HF = {
    "hf-llama": {"model_type": "llama", "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12,
                 "num_attention_heads": 12, "num_key_value_heads": 12, "vocab_size": VOCAB,
                 "max_position_embeddings": 8192, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
                 "tie_word_embeddings": True},
    "hf-mamba": {"model_type": "mamba", "hidden_size": 768, "num_hidden_layers": 24, "state_size": 16,
                 "expand": 2, "conv_kernel": 4, "vocab_size": VOCAB, "tie_word_embeddings": True},
}
LABEL = {"mamba": "zoo mamba-130m", "mamba2": "zoo mamba2-130m", "transformerpp": "zoo transformerpp-130m",
         "gla": "zoo gla-130m", "jamba": "zoo jamba-130m", "hf-llama": "transformers LlamaForCausalLM 125M",
         "hf-mamba": "transformers MambaForCausalLM 130M"}
BASELINE_OF = {"mamba": "hf-mamba", "transformerpp": "hf-llama", "mamba2": "transformerpp", "gla": "transformerpp",
               "jamba": "transformerpp"}


def build(name: str, dtype: torch.dtype, device: torch.device, state_dtype: str = "float32"):
    from transformers import AutoModelForCausalLM

    import zoo

    torch.manual_seed(0)
    if name in HF:
        # transformers' own classes, named: the Auto mappings can hold another package's class for "mamba"
        # (fla's import registers its Mamba there), and the baseline must be transformers' model
        import transformers

        fields = dict(HF[name])
        model_type = fields.pop("model_type")
        config_class, model_class = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                                     "mamba": (transformers.MambaConfig, transformers.MambaForCausalLM)}[model_type]
        with torch.device(device):
            model = model_class(config_class(**fields))
    else:
        config = zoo.ZooConfig.from_yaml(ROOT / "configs" / "models" / f"{name}-130m.yaml",
                                         decode_state_dtype=state_dtype)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config)
    return model.to(dtype).eval()


def step_state_nbytes(layer: RecurrentLayer) -> int:
    """Bytes of a recurrent layer's states as a decode step reads them: the conv state in fp32 and the recurrent
    state in the layer's state_dtype (decode_state_dtype "model": the model's dtype). A prefill leaves the
    recurrent state in fp32, so the cache's own bytes overstate a low-precision step's."""
    conv, state = layer.conv_state, layer.recurrent_state
    conv_bytes = 0 if conv is None else conv.numel() * 4
    return conv_bytes + (0 if state is None else state.numel() * layer.state_dtype.itemsize)


def decode_traffic(cache, name: str, context_growth: float = 1.0) -> int:
    """Cache bytes one decode step moves through HBM: the recurrent layers' conv and SSM / GLA states read and
    written (a hybrid's Mamba layers too, beside its attention layers), keys and values read (the new token's write is
    one slot in thousands); transformers' Mamba cache, all states, read and written. `cache` is the prefill's;
    context_growth scales the keys and values of layers that hold the whole prompt to the mean context of the timed
    steps (prompt + warmup + half the new tokens, over the prompt): they were counted at the prompt's length, ~3%
    short of what the steps read at a 2K prompt. A sliding-window layer (fewer keys than the prompt) stays as is."""
    if name == "hf-mamba":
        return 2 * cache_nbytes(cache)
    nbytes = cache_nbytes(cache)
    layers = getattr(cache, "layers", None) or []
    if isinstance(cache, ZooCache):  # the recurrent states as the steps keep them, read and written back every step
        recurrent = [layer for layer in layers if isinstance(layer, RecurrentLayer)]
        nbytes += 2 * sum(map(step_state_nbytes, recurrent)) - cache_nbytes([layer.tensors() for layer in recurrent])
    longest = max((layer.keys.shape[-2] for layer in layers if getattr(layer, "keys", None) is not None), default=0)
    for layer in layers:
        keys = getattr(layer, "keys", None)
        if keys is not None and not isinstance(layer, RecurrentLayer) and keys.shape[-2] == longest:
            nbytes += round(cache_nbytes([keys, layer.values]) * (context_growth - 1.0))
    return nbytes


def cap_fla_autotuning(models, configs: int) -> str | None:
    """Let each fla autotuner (GLA's prefill, where fla-core imports) try only its first `configs` configs when
    `models` has GLA (0: all); returns the note for the rows, or None when nothing was capped."""
    if "gla" not in models or configs <= 0:
        return None
    from zoo_kernels.gla import fast

    if fast._fla_chunk_gla() is None:
        return None
    fast.cap_fla_autotuning(configs)  # fla's kernels are imported by the check above, so their autotuners exist
    return f"fla autotuners capped at their first {configs} configs (GLA prefill)"


def time_decode(decoder: EagerDecoder, n_tokens: int, warmup: int) -> float:
    """Milliseconds per decode step (CUDA events around n_tokens steps, after warmup steps)."""
    decoder.decode(warmup)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    decoder.decode(n_tokens)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / n_tokens


def measure(model, name: str, batch: int, prompt_len: int, n_tokens: int, warmup: int, graph: str) -> dict:
    """Prefill + decode timings and memory of one model at one batch size."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(1234 + batch)
    vocab = model.get_input_embeddings().num_embeddings
    prompt = torch.randint(0, vocab, (batch, prompt_len), generator=generator).to(device)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    row: dict = {"batch": batch}
    gc.collect()
    torch.cuda.empty_cache()
    try:
        # the first prefill pays the kernels' builds and autotuning (fla's GLA prefill: tens of seconds); the second
        # is the prefill's time
        for key in ("prefill_first_ms", "prefill_ms"):
            state = None
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            state = prefill(model, prompt)
            end.record()
            end.synchronize()
            row[key] = start.elapsed_time(end)
        row["graphable"] = graphable(state.cache)
        # the cache as the prefill left it (the prompt's keys and values), before any step grows it: read after the
        # eager timing it held prompt + warmup + new tokens, after the one untimed step of --graph only prompt + 1,
        # so cache_mib and the floor depended on --graph
        row["cache_mib"] = cache_nbytes(state.cache) / 2**20
        traffic = decode_traffic(state.cache, name, (prompt_len + warmup + (n_tokens + 1) / 2) / prompt_len)
        torch.cuda.reset_peak_memory_stats()
        if graph != "only" or not row["graphable"]:
            row["eager_ms"] = time_decode(EagerDecoder(model, state), n_tokens, warmup)
        else:  # one eager step for the decode memory, untimed
            EagerDecoder(model, state).step()
            torch.cuda.synchronize()
        row["decode_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        del state
        if graph != "off" and row["graphable"]:
            try:  # KV layers made static with room for the timed steps (prompt + warmup + new tokens in all)
                decoder = GraphDecoder(model, prefill(model, prompt), max_new_tokens=warmup + n_tokens)
                torch.cuda.reset_peak_memory_stats()  # from here: the static caches and the graph's live buffers
                row["graph_ms"] = time_decode(decoder, n_tokens, warmup)
                row["graph_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                del decoder
            except Exception as e:  # a kernel that cannot be captured: keep the eager figure, say why
                row["graph_error"] = f"{type(e).__name__}: {e}"[:300]
        if row.get("graph_ms") is None and row.get("eager_ms") is None:  # --graph only, and no graph: eagerly
            row["eager_ms"] = time_decode(EagerDecoder(model, prefill(model, prompt)), n_tokens, warmup)
        options = {"eager": row.get("eager_ms"), "graph": row.get("graph_ms")}
        mode = min((k for k, v in options.items() if v is not None), key=lambda k: options[k])
        row.update(mode=mode, ms=options[mode], tokens_per_s=batch / options[mode] * 1e3)
        row["floor_ms"] = floor_ms(param_bytes + traffic)
    except torch.OutOfMemoryError:
        row.update(ms=None, tokens_per_s=None, note="out of memory")
    gc.collect()
    torch.cuda.empty_cache()
    return row


def make_rows(results: dict[tuple[str, int], dict], card: str, command: str, prompt_len: int, n_tokens: int,
              state_dtype: str = "float32", models: list[str] | None = None) -> list[dict]:
    """One results.jsonl row per measured (model, batch); `models` (--models): a row whose baseline has no time says
    why (not in --models, out of memory, not measured), where its baseline and ratio were null without a word."""
    date = datetime.date.today().isoformat()
    rows = []
    for (name, batch), r in results.items():
        base_name = BASELINE_OF.get(name)
        base = results.get((base_name, batch)) if base_name else None
        tpp = results.get(("transformerpp", batch))
        ok = r.get("ms") is not None
        suffix = "" if prompt_len == 2048 else f"/P{prompt_len}"  # the issue's 2K prompt keeps the plain name
        if state_dtype != "float32" and name not in HF:
            suffix += f"/state-{state_dtype}"
        row = {"name": f"generate/{name}/B{batch}{suffix}", "card": card, "date": date, "command": command,
               "torch": torch.__version__, "model": LABEL[name], "batch": batch, "prompt_len": prompt_len,
               "new_tokens": n_tokens, "dtype": "bf16",
               "decode_state_dtype": None if name in HF else state_dtype,
               "ours_ms": round(r["ms"], 3) if ok else None, "mode": r.get("mode"),
               "eager_ms": round(r["eager_ms"], 3) if r.get("eager_ms") else None,
               "graph_ms": round(r["graph_ms"], 3) if r.get("graph_ms") else None,
               "tokens_per_s": round(r["tokens_per_s"], 1) if ok else None,
               "prefill_ms": round(r["prefill_ms"], 2) if r.get("prefill_ms") else None,
               "prefill_first_ms": round(r["prefill_first_ms"], 2) if r.get("prefill_first_ms") else None,
               "decode_peak_gib": round(r["decode_peak_gib"], 3) if r.get("decode_peak_gib") else None,
               "graph_peak_gib": round(r["graph_peak_gib"], 3) if r.get("graph_peak_gib") else None,
               "cache_mib": round(r["cache_mib"], 2) if r.get("cache_mib") else None,
               "floor_ms": round(r["floor_ms"], 4) if r.get("floor_ms") else None,
               "baseline": LABEL[base_name] if base and base.get("ms") else None,
               "baseline_ms": round(base["ms"], 3) if base and base.get("ms") else None,
               "ratio": round(base["ms"] / r["ms"], 3) if ok and base and base.get("ms") else None,
               "ratio_is": "baseline_ms / ours_ms at the same batch (> 1: ours decodes faster)"}
        mixed = None
        if name in ZOO and tpp and tpp.get("ms") and ok:
            row["vs_transformerpp"] = round(tpp["ms"] / r["ms"], 3)
            row["transformerpp_mode"] = tpp.get("mode")
            if r.get("graph_ms") and tpp.get("graph_ms"):  # graph against graph, whichever was faster
                row["vs_transformerpp_graph"] = round(tpp["graph_ms"] / r["graph_ms"], 3)
            if tpp.get("mode") != r.get("mode"):  # e.g. Transformer++'s capture failed: its eager step, whose
                # KV cache grows by concatenation, is no graph step's baseline
                mixed = (f"vs_transformerpp compares this model's {r.get('mode')} step with Transformer++'s "
                         f"{tpp.get('mode')} step")
        # both where both exist (--graph only: the capture failed, then the eager fallback ran out of memory)
        notes = [r[key] for key in ("graph_error", "note") if r.get(key)] + ([mixed] if mixed else [])
        if models is not None and base_name and ok and row["baseline"] is None:
            why = ("not in --models" if base_name not in models
                   else (base or {}).get("note") or "not measured")
            notes.append(f"no baseline: {LABEL[base_name]} {why}")
        if notes:
            row["note"] = "; ".join(notes)
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| model | batch | mode | tokens/s | ms/step | eager ms | graph ms | floor ms | prefill ms | peak GiB | "
             "graph peak GiB | cache MiB | baseline | ratio | vs Transformer++ |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def f(value, spec: str) -> str:
        return "—" if value is None else format(value, spec)

    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r.get('mode') or '—'} | {f(r['tokens_per_s'], ',.0f')} | "
                     f"{f(r['ours_ms'], '.2f')} | {f(r['eager_ms'], '.2f')} | {f(r['graph_ms'], '.2f')} | "
                     f"{f(r['floor_ms'], '.3f')} | {f(r['prefill_ms'], '.0f')} | {f(r['decode_peak_gib'], '.2f')} | "
                     f"{f(r.get('graph_peak_gib'), '.2f')} | "
                     f"{f(r['cache_mib'], '.1f')} | {r['baseline'] or '—'} | {f(r['ratio'], '.2f')} | "
                     f"{f(r.get('vs_transformerpp'), '.2f')} |")
    return "\n".join(lines)


def batch_list(text: str) -> list[int]:
    """--batches as argparse's type: a comma list of sizes >= 1 (int() failed in a traceback after the model builds
    on a GPU, and a 0 batch or an empty list measured nothing)."""
    batches = number_list(text)
    if not batches or min(batches) < 1:
        raise argparse.ArgumentTypeError(f"expected a comma list of batch sizes >= 1 such as 1,16,64, got {text!r}")
    return batches


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=[*ZOO, "hf-mamba", "hf-llama"], choices=[*ZOO, *HF])
    # checked here, before the CUDA check and the model builds (0 new tokens divided by zero after a whole prefill)
    p.add_argument("--batches", type=batch_list, default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--prompt-len", type=positive_int, default=2048)
    p.add_argument("--new-tokens", type=positive_int, default=128)
    p.add_argument("--warmup", type=non_negative_int, default=4)
    p.add_argument("--graph", choices=["auto", "off", "only"], default="auto",
                   help="auto: also time CUDA-graph decoding where the cache allows it; only: skip the eager timing "
                   "of models that decode in a graph (a third of the run's time; a model whose graph capture fails "
                   "is timed eagerly)")
    p.add_argument("--fla-autotune-configs", type=non_negative_int, default=2,
                   help="let each fla autotuner (GLA's prefill, where fla-core is importable) try only its first N "
                   "configs (0: all). A full autotune on a fresh machine outlasted two device calls; the decode step "
                   "does not use fla, only the prefill does")
    p.add_argument("--state-dtype", choices=["float32", "model"], default="float32",
                   help="the zoo models' decode_state_dtype: 'model' keeps Mamba-2's and GLA's recurrent states in "
                   "bf16 while decoding, as mamba_ssm's cache does (transformers 5.25's keep fp32 recurrent "
                   "states); rows get a /state-model suffix")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results.jsonl"))
    args = p.parse_args(argv)
    for option, values in (("--models", args.models), ("--batches", args.batches)):
        twice = sorted({str(v) for v in values if values.count(v) > 1})
        if twice:  # (each was measured again, and an interruption's count of measurements included the repeats)
            p.error(f"{option}: {', '.join(twice)} given more than once; name each once")
    if not torch.cuda.is_available():
        sys.exit("benchmarks/generate.py needs a CUDA GPU")
    device = torch.device("cuda")
    batches = args.batches
    fla_note = cap_fla_autotuning(args.models, args.fla_autotune_configs)
    order = [m for m in args.models if m == "transformerpp"] + [m for m in args.models if m != "transformerpp"]
    results: dict[tuple[str, int], dict] = {}
    backends: dict[str, dict] = {}
    cut = None

    try:  # `timeout` sends SIGTERM: keep the rows measured so far
        with sigterm_interrupts(name_signal=True):
            for name in order:
                model = build(name, torch.bfloat16, device, args.state_dtype)
                if hasattr(model, "backend_report"):
                    backends[name] = model.backend_report()
                for batch in batches:
                    r = measure(model, name, batch, args.prompt_len, args.new_tokens, args.warmup, args.graph)
                    results[(name, batch)] = r
                    print(f"{name} B={batch}: {r.get('tokens_per_s') or 0:,.0f} tok/s ({r.get('mode')}; eager "
                          f"{r.get('eager_ms') or 0:.2f} ms, graph {r.get('graph_ms') or 0:.2f} ms) "
                          f"{r.get('graph_error', '') or r.get('note', '')}", flush=True)
                del model
                gc.collect()
                torch.cuda.empty_cache()
    except KeyboardInterrupt as e:
        done = sorted({k[0] for k in results})
        cut = (f"run interrupted ({str(e) or 'Ctrl-C'}) after {len(results)} of {len(order) * len(batches)} "
               f"measurements")
        print(f"\n{cut}; writing the rows of {done}", flush=True)
    command = "python benchmarks/generate.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    rows = make_rows({k: results[k] for k in sorted(results, key=lambda k: (args.models.index(k[0]), k[1]))},
                     torch.cuda.get_device_name(), command.strip(), args.prompt_len, args.new_tokens,
                     args.state_dtype, args.models)
    for row in rows:
        row["note"] = "; ".join(x for x in (row.get("note"), fla_note if "/gla/" in row["name"] else None, cut)
                                if x) or None
    for row in rows:
        name = row["name"].split("/")[1]
        if name in backends:
            row["backend"] = backends[name]
    with open(args.out, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(markdown_table(rows))
    print(f"\n{len(rows)} rows appended to {args.out}", flush=True)
    if cut:  # interrupted mid-measurement: skip the interpreter's teardown of half-built CUDA graphs (it hung for
        # minutes after a SIGTERM on 2026-12-03), with exit status 130 as train_throughput's (it was 0: a run cut
        # short by `timeout` or Ctrl-C passed for a finished one)
        sys.stdout.flush()
        os._exit(130)


if __name__ == "__main__":
    main()
