"""Benchmark: end-to-end pretraining throughput of the zoo's 130M models vs transformers' own models.

Each model trains under zoo.train (the real loop: packed rows from the built-in corpus, byte tokenizer,
AdamW, bf16 autocast, grad clip, fused AdamW) for --warmup + --steps optimizer steps at L = 2048 and 8192
with the same tokens per step; tokens/s is measured over the steps after the warmup (a device sync per
step), counting real tokens (the pads of unpacked rows are no work; padded_tokens_per_s counts every
position). Models:

- zoo: configs/models/{mamba,mamba2,transformerpp,jamba,jamba2}-130m.yaml (vocab 50280 kept: the byte tokenizer uses 259
  of it, so the embedding and logits cost what they cost with the GPT-NeoX tokenizer);
- baselines, the same sizes: transformers' LlamaForCausalLM (12 x 768, 12 heads, SwiGLU 2048, tied
  embeddings; packed rows through position_ids, which transformers turns into a document mask) and
  MambaForCausalLM (24 x 768, d_state 16; it takes no position_ids or seq_idx, so its rows are unpacked,
  and without mamba_ssm/causal-conv1d it runs its per-token scan loop: it is timed for one step of one row
  at L = 2048 only, after a short probe that skips it when the projected step exceeds --max-baseline-step-s).

Rows (benchmarks/results.jsonl): ours_ms and baseline_ms are milliseconds per optimizer step of the same
tokens (a baseline measured at another batch is scaled per token); ratio = baseline_ms / ours_ms (> 1: ours
is faster). The zoo Mamba rows take transformers' Mamba as baseline; Transformer++ and Jamba (the hybrid,
against the Transformer of its size) take Llama; each baseline also gets a row of its own.
MFU = training FLOPs per token · tokens/s / peak (zoo.train's mfu; mfu_formula names the FLOPs: '3x_forward',
3 × zoo.compare's forward accounting at L, attention over the keys a token sees and the scans included, or
'6n_active' for a model the accounting cannot count), the peak being the card's dense bf16 tensor-core figure
(H100 SXM 989 TFLOP/s, from zoo.train.PEAK_BF16_TFLOPS; --peak-tflops to change it). mfu_6n (and baseline_mfu_6n)
= 6 · active parameters · tokens/s / peak (an MoE layer's skipped experts left out), the mfu of the rows that have
no mfu_formula; it ignores attention's L-dependent FLOPs, so it understates attention models at L = 8192 (3 ×
forward is 1.15 x 6N for the 130M Transformer++ at 2048, 1.61 x at 8192). floor_ms = training FLOPs · tokens /
peak (the same FLOPs as mfu; floor_ms_6n = 6 · N_active · tokens / peak, the floor_ms of rows without
mfu_formula).
peak_mem_gib = torch.cuda.max_memory_allocated over the run. Ctrl-C or SIGTERM (a `timeout`) ends the run: the rows
measured so far are written, each with a note saying it was cut short, and the exit status is 130.

    python benchmarks/train_throughput.py                       # everything above
    python benchmarks/train_throughput.py --models mamba hf-mamba --seq-lens 2048 --steps 10
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from zoo.eval.common import non_negative_int, positive_int, sigterm_interrupts  # noqa: E402
from zoo.train import config_from_dict, peak_tflops, train  # noqa: E402

VOCAB = 50280
MODELS = {
    "mamba": str(ROOT / "configs/models/mamba-130m.yaml"),
    "transformerpp": str(ROOT / "configs/models/transformerpp-130m.yaml"),
    "jamba": str(ROOT / "configs/models/jamba-130m.yaml"),
    "mamba2": str(ROOT / "configs/models/mamba2-130m.yaml"),
    "jamba2": str(ROOT / "configs/models/jamba2-130m.yaml"),
    "hf-llama": {"model_type": "llama", "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12,
                 "num_attention_heads": 12, "num_key_value_heads": 12, "vocab_size": VOCAB,
                 "max_position_embeddings": 8192, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
                 "tie_word_embeddings": True},
    "hf-mamba": {"model_type": "mamba", "hidden_size": 768, "num_hidden_layers": 24, "state_size": 16,
                 "expand": 2, "conv_kernel": 4, "vocab_size": VOCAB, "tie_word_embeddings": True},
}
BASELINE_OF = {"mamba": "hf-mamba", "jamba": "hf-llama", "transformerpp": "hf-llama", "jamba2": "hf-llama"}
LABEL = {"mamba": "zoo mamba-130m", "transformerpp": "zoo transformerpp-130m", "jamba": "zoo jamba-130m",
         "mamba2": "zoo mamba2-130m", "jamba2": "zoo jamba2-130m (Mamba-2 + attention)",
         "hf-llama": "transformers LlamaForCausalLM 125M", "hf-mamba": "transformers MambaForCausalLM 130M"}


def run(name: str, seq_len: int, micro_batch: int, grad_accum: int, warmup: int, steps: int, compile_: bool,
        workdir: Path) -> dict:
    """Train `name` for warmup + steps steps; returns its measurements."""
    packing = name != "hf-mamba"
    cfg = config_from_dict({
        "model": MODELS[name], "output_dir": str(workdir / f"{name}-{seq_len}-{micro_batch}"),
        "data": {"source": "stdlib", "seq_len": seq_len, "packing": packing},
        "train": {"max_steps": warmup + steps, "micro_batch_size": micro_batch, "grad_accum": grad_accum,
                  "precision": "bf16", "compile": compile_},
        "optim": {"lr": 6e-4}, "schedule": {"warmup_steps": 0},
        "checkpoint": {"every": 0, "final": False},
        "log": {"every": warmup + steps, "trackers": [], "progress_bar": False},
    })
    stamps: list[float] = []
    losses: list[float] = []
    real: list[int] = []  # each step's tokens that are not pads (hf-mamba's unpacked rows are right-padded)

    def on_step(step: int, metrics: dict) -> None:  # float(loss) in the trainer synchronized the device
        stamps.append(time.perf_counter())
        losses.append(metrics["loss"])
        real.append(metrics["real_tokens"])

    gc.collect()  # the previous run's model and optimizer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if train(cfg, on_step=on_step).stopped:  # SIGTERM or Ctrl-C: the trainer saved and returned; the run stops too
        # (it timed the steps done as a full measurement, or failed on too few, and the next model trained on)
        raise KeyboardInterrupt(f"{name} L={seq_len} stopped after {len(stamps)} of {warmup + steps} steps")
    info = json.loads((Path(cfg.output_dir) / "run_info.json").read_text())
    tokens_per_step = info["tokens_per_step"]
    timed = stamps[warmup - 1:] if warmup else [start] + stamps
    if len(timed) < 2:  # the trainer stopped early (SIGTERM from a timeout, Ctrl-C): nothing to time
        raise RuntimeError(f"{name} L={seq_len}: training stopped after {len(stamps)} of {warmup + steps} steps; "
                           f"no timed steps")
    step_s = (timed[-1] - timed[0]) / (len(timed) - 1)
    real_per_step = sum(real[len(real) - (len(timed) - 1):]) / (len(timed) - 1)  # the timed steps'

    # MFU and the floor follow zoo.train's training FLOPs per token; mfu_6n the parameters a token runs through
    return {"params": info["params"], "active_params": info.get("active_params", info["params"]),
            "flops_per_token": info["flops_per_token"], "mfu_formula": info["mfu_formula"],
            "backend": info["backend"], "tokens_per_step": tokens_per_step,
            "step_ms": step_s * 1e3, "tokens_per_s": real_per_step / step_s,
            "padded_tokens_per_s": tokens_per_step / step_s, "packing": packing,
            "micro_batch": micro_batch, "grad_accum": grad_accum, "steps_timed": len(timed) - 1,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else 0.0,
            "loss_first": losses[0],
            "loss_last": losses[-1]}


def make_rows(results: dict[tuple[str, int], dict], card: str, command: str, peak: float, compile_: bool,
              cut: str | None = None, missing: dict[tuple[str, int], str] | None = None) -> list[dict]:
    """One results.jsonl row per measured (model, L), with its baseline of the same L; `cut`: why the run ended before
    every measurement (each row's note says it); `missing`: why a (model, L) has no measurement, for the note of a row
    whose baseline it is."""
    date = datetime.date.today().isoformat()
    rows = []
    split = os.environ.get("ZOO_SCAN_SEQ_SPLIT")  # the Mamba scan's sequence split, when forced
    for (name, L), r in results.items():
        base_name = BASELINE_OF.get(name)
        base = results.get((base_name, L)) if base_name else None
        ours_ms = r["step_ms"]
        tokens = r["tokens_per_step"]
        baseline_ms = tokens / base["tokens_per_s"] * 1e3 if base else None
        mfu = r["flops_per_token"] * r["tokens_per_s"] / (peak * 1e12)
        row = {
            "name": f"train_throughput/{name}/L{L}" + (f"/seq_split={split}" if split else ""), "card": card,
            "date": date, "command": command,
            "torch": torch.__version__, "model": LABEL[name], "seq_len": L, "ours_ms": round(ours_ms, 2),
            "tokens_per_step": tokens, "tokens_per_s": round(r["tokens_per_s"], 1), "mfu": round(mfu, 4),
            "mfu_6n": round(6 * r["active_params"] * r["tokens_per_s"] / (peak * 1e12), 4),
            "mfu_formula": r["mfu_formula"], "flops_per_token": r["flops_per_token"],
            "peak_tflops": peak, "floor_ms": round(r["flops_per_token"] * tokens / (peak * 1e12) * 1e3, 2),
            "floor_ms_6n": round(6 * r["active_params"] * tokens / (peak * 1e12) * 1e3, 2),
            "params": r["params"], "active_params": r["active_params"], "peak_mem_gib": round(r["peak_mem_gib"], 2),
            "packing": r["packing"],
            "micro_batch": r["micro_batch"], "grad_accum": r["grad_accum"], "steps_timed": r["steps_timed"],
            "loss_first": round(r["loss_first"], 4), "loss_last": round(r["loss_last"], 4),
            "backend": r["backend"], "precision": "bf16", "compile": compile_ and name != "hf-mamba",
            "baseline": LABEL[base_name] if base else None,
            "baseline_ms": round(baseline_ms, 2) if base else None,
            "baseline_tokens_per_s": round(base["tokens_per_s"], 1) if base else None,
            "baseline_mfu": (round(base["flops_per_token"] * base["tokens_per_s"] / (peak * 1e12), 4)
                             if base else None),
            "baseline_mfu_6n": (round(6 * base["active_params"] * base["tokens_per_s"] / (peak * 1e12), 4)
                                if base else None),
            "baseline_mfu_formula": base["mfu_formula"] if base else None,
            "baseline_peak_mem_gib": round(base["peak_mem_gib"], 2) if base else None,
            "baseline_micro_batch": base["micro_batch"] if base else None,
            "ratio": round(baseline_ms / ours_ms, 3) if base else None,
            "ratio_is": "baseline_ms / ours_ms for the same tokens (> 1: ours is faster)",
        }
        if name in ("mamba", "jamba"):  # the Mamba-1 scan's sequence split: forced by the env, else its default
            row["scan_seq_split"] = split or "auto (selective_scan.auto_seq_split)"
        tpp = results.get(("transformerpp", L))
        if name not in ("transformerpp", "hf-llama", "hf-mamba") and tpp:  # issue 9: vs our Transformer++
            row["vs_transformerpp"] = round(r["tokens_per_s"] / tpp["tokens_per_s"], 3)
        if base_name and base is None and not cut:  # why: a Mamba row said --hf-mamba-seq-lens where --models left
            # transformers' Mamba out, and a Llama-paired row whose Llama was not asked for said nothing
            why = (missing or {}).get((base_name, L), "not measured")
            row["note"] = f"no baseline: {LABEL[base_name]} {why}"
        if cut:
            row["note"] = cut
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| model | L | tokens/s | MFU (3x forward FLOPs) | MFU (6N) | ms/step | floor ms | peak GiB | baseline "
             "| baseline tokens/s | ratio |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        base = (f"{row['baseline']} | {row['baseline_tokens_per_s']:,.0f} | {row['ratio']:.2f}"
                if row["baseline"] else "— | — | —")
        lines.append(f"| {row['model']} | {row['seq_len']} | {row['tokens_per_s']:,.0f} | {row['mfu']:.1%}"
                     f"{'' if row['mfu_formula'] == '3x_forward' else ' (6N)'} | {row['mfu_6n']:.1%} | "
                     f"{row['ours_ms']:.1f} | {row['floor_ms']:.1f} | {row['peak_mem_gib']:.1f} | {base} |")
    return "\n".join(lines)


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def command_line(argv: list[str]) -> str:
    """The rows' command: the script relative to the repository where it lies inside it, else as it was given (an
    absolute path outside, or through a symlink, failed in relative_to after the CUDA check)."""
    script = Path(argv[0])
    if script.is_absolute():
        try:
            script = script.resolve().relative_to(ROOT)
        except ValueError:
            pass
    return "python " + " ".join(shlex.quote(str(a)) for a in [script, *argv[1:]])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # sizes and counts checked here, before the CUDA check: L = 0 divided by zero, and --steps 0 trained every
    # model's warmup to fail on 'no timed steps'
    p.add_argument("--models", nargs="+", default=["mamba", "transformerpp", "jamba", "hf-llama", "hf-mamba"],
                   choices=list(MODELS))
    p.add_argument("--seq-lens", nargs="+", type=positive_int, default=[2048, 8192])
    p.add_argument("--tokens-per-micro", type=positive_int, default=16384, help="micro-batch rows = this / L")
    p.add_argument("--grad-accum", type=positive_int, default=4)
    p.add_argument("--warmup", type=non_negative_int, default=5)
    p.add_argument("--steps", type=positive_int, default=20)
    p.add_argument("--compile", action="store_true", help="train.compile for every model")
    p.add_argument("--hf-mamba-seq-lens", nargs="+", type=positive_int, default=[2048])
    p.add_argument("--hf-mamba-micro-batch", type=positive_int, default=1,
                   help="rows per step for transformers' Mamba (its scan keeps fp32 [B, D, L, N] tensors per layer)")
    p.add_argument("--max-baseline-step-s", type=positive_float, default=150.0,
                   help="skip transformers' Mamba where one projected step would take longer")
    p.add_argument("--peak-tflops", type=positive_float, default=None, help="default: the card's dense bf16 peak")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results.jsonl"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("train_throughput: needs a CUDA GPU")
    device = torch.device("cuda")
    card = torch.cuda.get_device_name(device)
    peak = args.peak_tflops or peak_tflops(device)
    if peak is None:
        sys.exit(f"train_throughput: no known bf16 peak for {card!r}; pass --peak-tflops")
    command = command_line(sys.argv)
    results: dict[tuple[str, int], dict] = {}
    cut = None

    # the measurements finished are written when SIGTERM (`timeout`'s) or Ctrl-C ends the run: they were all lost,
    # written only after the last one (zoo.train's own handler asks its loop to stop while a model trains)
    total = sum(name != "hf-mamba" or L in args.hf_mamba_seq_lens for L in args.seq_lens for name in args.models)
    missing = {(base, L): "not in --models" for base in set(BASELINE_OF.values()) if base not in args.models
               for L in args.seq_lens}
    try:
        with sigterm_interrupts(name_signal=True), tempfile.TemporaryDirectory() as tmp:
            measure_all(args, Path(tmp), results, missing)
    except KeyboardInterrupt as e:
        cut = f"run interrupted ({str(e) or 'Ctrl-C'}) after {len(results)} of {total} measurements"
        print(f"\n{cut}; writing the rows measured", flush=True)
    rows = make_rows(results, card, command, peak, args.compile, cut, missing)
    with open(args.out, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"\n{card}, {datetime.date.today().isoformat()}, peak {peak:g} TFLOP/s (dense bf16), "
          f"{len(rows)} rows -> {args.out}\n")
    print(markdown_table(rows))
    if cut:
        sys.exit(130)
    if any(math.isnan(r["loss_last"]) for r in results.values()):
        sys.exit("train_throughput: a run produced a NaN loss")


def measure_all(args, workdir: Path, results: dict[tuple[str, int], dict],
                missing: dict[tuple[str, int], str] | None = None) -> None:
    """Every (model, L) of the command line, measured into `results` as each finishes; why one is skipped, into
    `missing`."""
    missing = {} if missing is None else missing
    for L in args.seq_lens:
        micro = max(1, args.tokens_per_micro // L)
        for name in args.models:
            if name == "hf-mamba":
                if L not in args.hf_mamba_seq_lens:
                    missing[name, L] = f"not timed at L = {L} (per-token scan loop; see --hf-mamba-seq-lens)"
                    continue
                # its scan is a Python loop over tokens: probe a short row, then time one step at L
                probe_L = 256
                probe = run(name, probe_L, args.hf_mamba_micro_batch, 1, 1, 1, False, workdir)
                projected = probe["step_ms"] / 1e3 * L / probe_L
                print(f"hf-mamba probe: {probe['step_ms']:.0f} ms per step at L={probe_L}; one step at L={L} "
                      f"projected {projected:.0f} s", flush=True)
                if projected > args.max_baseline_step_s:
                    print(f"hf-mamba L={L}: skipped (projected {projected:.0f} s > --max-baseline-step-s)")
                    missing[name, L] = (f"skipped: one step at L = {L} projected at {projected:.0f} s, over "
                                        f"--max-baseline-step-s")
                    continue
                results[name, L] = run(name, L, args.hf_mamba_micro_batch, 1, 1, 1, False, workdir)
            else:
                results[name, L] = run(name, L, micro, args.grad_accum, args.warmup, args.steps, args.compile,
                                       workdir)
            r = results[name, L]
            print(f"{name} L={L}: {r['tokens_per_s']:,.0f} tokens/s, {r['step_ms']:.1f} ms/step, "
                  f"{r['peak_mem_gib']:.1f} GiB, loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}", flush=True)


if __name__ == "__main__":
    main()
