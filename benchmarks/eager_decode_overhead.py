"""Host overhead of the eager decode: mean wall time per generated token of a plain `model.generate()`.

A user's `model.generate(input_ids, max_new_tokens=N, do_sample=False)` decodes eagerly (no CUDA graph), and for the
small models a step is bound by the host's Python, not by the device. This script builds a tiny model of each family
from configs/models/<family>-tiny.yaml (d_model 64, 2-8 layers, random weights, seed 0; --size 130m: the 130M
configs), takes a batch-1 prompt of
--prompt-len random tokens, runs one warm-up generate, then --repeats timed calls of

    model.generate(input_ids, attention_mask=ones, max_new_tokens=N, do_sample=False)

and prints, per family, the median over the repeats of (wall time of the call) / N in ms: the per-token cost of
transformers' loop plus zoo's forward, prompt prefill included (one forward in N + 1). On the CPU (the default; one
thread, so the arithmetic of a 64-wide model is negligible) what is left is host overhead; on CUDA (--device cuda,
synchronized after each call) it is the eager step a user gets, host-bound for small models.

    PYTHONPATH=.:kernels python benchmarks/eager_decode_overhead.py                      # every family, CPU
    PYTHONPATH=.:kernels python benchmarks/eager_decode_overhead.py --device cuda --dtype bfloat16
    PYTHONPATH=.:kernels python benchmarks/eager_decode_overhead.py --families mamba --profile cprofile
    PYTHONPATH=.:kernels python benchmarks/eager_decode_overhead.py --dump /tmp/out.pt   # tokens + logits
    PYTHONPATH=.:kernels python benchmarks/eager_decode_overhead.py --device cuda --cuda-graph --new-tokens 256

--profile cprofile / torch prints where the host time of one generate call of the first family goes (cProfile's
top functions by own time and by cumulative time, or torch.profiler's top operators). --dump writes each family's
greedy tokens and per-step logits (output_logits=True) so that two versions of the code can be compared bit for
bit. --json prints one JSON line of the medians (what an A/B driver reads). On CUDA, fla's autotuners are capped
at their first --fla-autotune-configs configs (2; 0: all), as in benchmarks/generate.py. --cuda-graph (CUDA) times
`generate(..., cuda_graph=True)` beside it: each such call prefills, makes the cache static, captures one decode
step in a CUDA graph (two warm-up steps first) and replays it, all inside the timed call; and
`generate(..., cuda_graph="reuse")`, whose warm-up call keeps the graph on the model, so that each timed call
prefills, reloads the kept buffers and replays (no warm-up steps, no capture).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "kernels")]  # this checkout's zoo and zoo_kernels, not an installed copy

import torch  # noqa: E402

from zoo.eval.common import positive_int, resolve_device  # noqa: E402

FAMILIES = {"mamba": "mamba", "mamba2": "mamba2", "transformerpp": "transformerpp", "gla": "gla", "jamba": "jamba"}


def build(family: str, device: str, dtype: torch.dtype, size: str = "tiny"):
    from transformers import AutoModelForCausalLM

    import zoo  # noqa: F401  (registers the zoo model type with the Auto classes)
    from zoo.config import ZooConfig

    torch.manual_seed(0)
    config = ZooConfig.from_yaml(ROOT / "configs" / "models" / f"{FAMILIES[family]}-{size}.yaml")
    model = AutoModelForCausalLM.from_config(config).to(device=device, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # every call makes exactly max_new_tokens tokens
    model.generation_config.pad_token_id = 0
    return model


def prompt(model, length: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=g).to(device)
    return ids, torch.ones_like(ids)


def generate(model, ids, mask, new_tokens: int, **kwargs):
    return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, **kwargs)


def time_family(model, ids, mask, new_tokens: int, repeats: int, **kwargs) -> float:
    """Median ms per generated token over `repeats` calls, after one warm-up call."""
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    with torch.inference_mode():
        generate(model, ids, mask, new_tokens, **kwargs)
        sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            generate(model, ids, mask, new_tokens, **kwargs)
            sync()
            times.append((time.perf_counter() - start) / new_tokens * 1e3)
    return statistics.median(times)


def profile_family(model, ids, mask, new_tokens: int, how: str, top: int) -> None:
    with torch.inference_mode():
        generate(model, ids, mask, new_tokens)
        if how == "cprofile":
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.enable()
            generate(model, ids, mask, new_tokens)
            prof.disable()
            stats = pstats.Stats(prof).strip_dirs()
            stats.sort_stats("tottime").print_stats(top)
            stats.sort_stats("cumulative").print_stats(top)
        else:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ids.is_cuda else [])
            with profile(activities=activities) as prof:
                generate(model, ids, mask, new_tokens)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", default="tiny", choices=["tiny", "130m"],
                   help="configs/models/<family>-<size>.yaml (130m: where the device's time starts to count)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    # counts >= 1, refused here: 0 ended in tracebacks (transformers' max_new_tokens, an empty prompt's last token,
    # the median of no repeats, torch.set_num_threads)
    p.add_argument("--new-tokens", type=positive_int, default=32)
    p.add_argument("--prompt-len", type=positive_int, default=8)
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (1: steadier timings)")
    p.add_argument("--profile", choices=["cprofile", "torch"], help="profile one call of the first family")
    p.add_argument("--top", type=positive_int, default=30)
    p.add_argument("--dump", help="write each family's tokens and logits to this file (torch.save) and exit")
    p.add_argument("--json", action="store_true", help="print the medians as one JSON line")
    p.add_argument("--cuda-graph", action="store_true",
                   help="also time generate(..., cuda_graph=True) (each call prefills, captures its graph, decodes)")
    p.add_argument("--fla-autotune-configs", type=int, default=2,
                   help="let each fla autotuner (GLA's prefill, where fla-core is importable) try only its first N "
                   "configs (0: all), as benchmarks/generate.py does: a full autotune of the prompt's shapes on a "
                   "fresh H100 outlasted a 170 s call")
    args = p.parse_args(argv)
    # (each was taken and did nothing: --profile and --dump run one plain generate per family and stop)
    ignored = [flag for flag, given in (("--cuda-graph", args.cuda_graph), ("--json", args.json),
                                        ("--repeats", args.repeats != p.get_default("repeats"))) if given]
    if (args.profile or args.dump) and ignored:
        p.error(f"{', '.join(ignored)}: options of the timing, which {'--profile' if args.profile else '--dump'} "
                f"does not run; leave {'them' if len(ignored) > 1 else 'it'} out")
    if args.profile and args.dump:
        p.error("--profile and --dump: each runs on its own; give one of them")
    try:  # (cuda:N past the GPUs went on to build the model there, and ended in a traceback)
        resolve_device(args.device)
    except ValueError as e:
        p.error(str(e))
    if args.cuda_graph and not args.device.startswith("cuda"):
        raise SystemExit("eager_decode_overhead.py: --cuda-graph needs --device cuda")
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if args.device.startswith("cuda"):
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from generate import cap_fla_autotuning

        note = cap_fla_autotuning(args.families, args.fla_autotune_configs)
        if note and not args.json:
            print(note)
    if args.profile:
        model = build(args.families[0], args.device, dtype, args.size)
        profile_family(model, *prompt(model, args.prompt_len, args.device), args.new_tokens, args.profile, args.top)
        return
    if args.dump:
        out = {}
        for family in args.families:
            model = build(family, args.device, dtype, args.size)
            with torch.inference_mode():
                res = generate(model, *prompt(model, args.prompt_len, args.device), args.new_tokens,
                               return_dict_in_generate=True, output_logits=True)
            out[family] = {"tokens": res.sequences.cpu(), "logits": torch.stack(res.logits).cpu()}
        torch.save(out, args.dump)
        return
    results = {}
    for family in args.families:
        model = build(family, args.device, dtype, args.size)
        ids, mask = prompt(model, args.prompt_len, args.device)
        eager = time_family(model, ids, mask, args.new_tokens, args.repeats)
        results[family] = eager
        line = f"{family:14s} {eager:8.3f} ms/token"
        if args.cuda_graph:
            graph = time_family(model, ids, mask, args.new_tokens, args.repeats, cuda_graph=True)
            # the warm-up call captures and keeps the graph; each timed call reloads its buffers and replays it
            kept = time_family(model, ids, mask, args.new_tokens, args.repeats, cuda_graph="reuse")
            model.release_cuda_graph()
            results[family] = {"eager": eager, "cuda_graph": graph, "cuda_graph_reuse": kept}
            line += (f"  cuda_graph=True {graph:8.3f} ms/token ({eager / graph:.1f}x)  "
                     f"cuda_graph='reuse' {kept:8.3f} ({eager / kept:.1f}x)")
        if not args.json:
            print(f"{line}  ({len(model.model.layers)} layers, {args.device}, {args.dtype}, batch 1, "
                  f"{args.new_tokens} new tokens)")
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
