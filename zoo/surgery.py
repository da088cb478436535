"""Hybrid surgery: a hybrid from a Transformer++ and a Mamba / Mamba-2 model, or a Transformer++ whose attention
layers are replaced by freshly initialised mixers at chosen positions — the usual start for distilling a
Transformer into a hybrid.

The base model (normally the Transformer++) gives the embeddings, every norm, every MLP / MoE, the head and
the layers it keeps; a donor model of the same d_model gives the mixers of the grafted layers, unchanged, so a
grafted layer's mixer computes exactly what it computed in the donor.

    zoo graft DST --base llama_folder --donor mamba_folder --pattern "AMAM AMAM"
    zoo graft DST --base llama_folder --pattern "AANA" --mixers "{N: {type: mamba2, head_dim: 32}}"
"""

from __future__ import annotations

import argparse
import copy
import functools
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from zoo.config import ZooConfig
from zoo.modeling import ZooForCausalLM

KEEP, DONOR = "A", "M"  # pattern letters: keep the base layer's mixer / take the donor layer's mixer
# config fields that describe the saved file, not the model
_FILE_FIELDS = ("model_type", "transformers_version", "architectures", "dtype", "torch_dtype")


def _parse_pattern(pattern: str, n_layers: int, fresh: dict[str, dict], has_donor: bool) -> list[str]:
    letters = [c for c in pattern if not c.isspace()]
    if len(letters) != n_layers:
        raise ValueError(f"pattern: {len(letters)} letters for a base model of {n_layers} layers; give one letter "
                         f"per layer")
    if KEEP in fresh:
        raise ValueError(f"mixers: {KEEP!r} means keep the base's mixer; name fresh mixers with another letter")
    for i, letter in enumerate(letters):
        if letter in fresh:
            if letter == DONOR and has_donor:
                raise ValueError(f"pattern: {DONOR!r} means the donor's mixer; name fresh mixers with another letter")
            continue
        if letter == DONOR and not has_donor:
            raise ValueError(f"pattern: letter {DONOR!r} (layer {i}) takes the donor's mixer, but no donor was given")
        if letter not in (KEEP, DONOR):
            raise ValueError(f"pattern: letter {letter!r} (layer {i}) is neither {KEEP!r} (keep the base mixer), "
                             f"{DONOR!r} (the donor's) nor a key of `mixers` ({', '.join(sorted(fresh)) or 'none'})")
    if fresh and not set(fresh) & set(letters):  # the base would be saved back without the fresh mixers asked for
        raise ValueError(f"mixers: {', '.join(map(repr, sorted(fresh)))} is no letter of the pattern {pattern!r}; "
                         f"put a letter in the pattern where its fresh mixer goes, or leave `mixers` out")
    # (spare letters beside used ones are fine: one mixers file, or a model config, serves several patterns)
    return letters


def graft(base: ZooForCausalLM, pattern: str, donor: ZooForCausalLM | None = None, *,
          mixers: dict[str, dict] | None = None, donor_layers: list[int] | None = None, mixer_norm: str = "base",
          seed: int = 0) -> ZooForCausalLM:
    """A new ZooForCausalLM with base's layout and weights, and other mixers at the positions `pattern` names.

    Args:
        base: the model whose embeddings, norms, feed-forwards, head and kept layers the hybrid has.
        pattern: one letter per base layer (spaces ignored): 'A' keeps base's mixer, 'M' takes donor's mixer,
            a key of `mixers` gets a freshly initialised mixer of that spec.
        donor: a zoo model of the same d_model (e.g. a Mamba); its embeddings, head and feed-forwards are unused.
        mixers: letter -> mixer spec ({type: mamba2, ...}) for fresh mixers (each layer keeps the base's ffn).
        donor_layers: the donor layer grafted at each 'M', in order (default: the same layer index).
        mixer_norm: 'base' keeps base's pre-mixer RMSNorm at grafted layers; 'donor' takes the donor layer's
            (the norm its mixer was trained behind; needs equal norm_eps).
        seed: seeds the initialisation of fresh mixers.
    The sources are not modified; the hybrid holds copies, in the widest dtype of base and donor (an fp32 donor
    makes a bf16 base's hybrid fp32, with a warning) so that every copied weight is exact.
    """
    fresh = {str(letter): spec for letter, spec in (mixers or {}).items()}  # YAML reads the letter 1 as a number
    base_specs = base.config.layer_specs()
    letters = _parse_pattern(pattern, len(base_specs), fresh, donor is not None)
    grafted = [i for i, c in enumerate(letters) if c == DONOR and c not in fresh]
    if mixer_norm not in ("base", "donor"):
        raise ValueError(f"mixer_norm: use 'base' or 'donor', got {mixer_norm!r}")
    if mixer_norm == "donor" and not grafted:  # (every layer kept the base's norm, without a word)
        raise ValueError(f"mixer_norm: 'donor' takes the pre-mixer norm of the layers grafted from the donor, and the "
                         f"pattern {pattern!r} grafts none (letter {DONOR!r}); leave it at 'base'")
    sources: dict[int, int] = {}
    if donor is not None:
        if donor.config.d_model != base.config.d_model:
            raise ValueError(f"donor: d_model {donor.config.d_model} differs from the base's {base.config.d_model}; "
                             f"grafted mixers need the same width")
        if mixer_norm == "donor" and donor.config.norm_eps != base.config.norm_eps:
            raise ValueError(f"mixer_norm: 'donor' needs equal norm_eps (donor {donor.config.norm_eps}, base "
                             f"{base.config.norm_eps}); use mixer_norm='base'")
        chosen = list(donor_layers) if donor_layers is not None else grafted
        if len(chosen) != len(grafted):
            raise ValueError(f"donor_layers: {len(chosen)} indices for {len(grafted)} 'M' letters in the pattern")
        n_donor = donor.config.num_hidden_layers
        for i, j in zip(grafted, chosen):
            if not 0 <= j < n_donor:
                raise ValueError(f"donor_layers: index {j} (for layer {i}) is outside the donor's {n_donor} layers")
            sources[i] = j
    elif donor_layers:
        raise ValueError("donor_layers: given without a donor")

    donor_specs = donor.config.layer_specs() if donor is not None else []
    specs = []
    for i, letter in enumerate(letters):
        if letter in fresh:
            spec = copy.deepcopy(dict(fresh[letter]))
            if spec.get("ffn", base_specs[i]["ffn"]) != base_specs[i]["ffn"]:  # (it was replaced without a word)
                raise ValueError(f"mixers.{letter}: ffn {spec['ffn']!r} differs from the base's feed-forward at layer "
                                 f"{i} ({base_specs[i]['ffn']!r}); a graft keeps every feed-forward of the base, so "
                                 f"leave ffn out of the fresh mixer")
        elif letter == DONOR:
            spec = copy.deepcopy(donor_specs[sources[i]])
        else:
            spec = copy.deepcopy(base_specs[i])
        spec["ffn"] = base_specs[i]["ffn"]
        specs.append(spec)
    fields = {k: v for k, v in base.config.to_dict().items() if k not in _FILE_FIELDS}
    try:
        config = ZooConfig(**(fields | {"layers": specs, "mixers": {}}))
    except ValueError as e:  # a fresh spec's mistake was named as layers[i], a field the user never wrote
        found = re.match(r"layers\[(\d+)\]", str(e))
        if found is None or letters[int(found.group(1))] not in fresh:
            raise
        raise ValueError(f"mixers.{letters[int(found.group(1))]}{str(e)[found.end():]}") from None

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hybrid = ZooForCausalLM(config)
    # the widest dtype of the sources, so that no copied weight is rounded (a bf16 base used to round an fp32
    # donor's A_log, D and dt bias to bf16 without a word, and its mixers no longer computed what they did)
    base_dtype, dtype = _widest_dtype(base), _widest_dtype(base, donor if grafted else None)
    if dtype != base_dtype:
        warnings.warn(f"graft: the hybrid is {dtype} (the donor's weights are {_widest_dtype(donor)}, the base's "
                      f"{base_dtype}) so that no weight is rounded; cast it with .to({base_dtype}) (zoo graft: "
                      f"--dtype) for a model in the base's dtype (the grafted mixers then compute in rounded "
                      f"weights)", stacklevel=2)
    hybrid.to(dtype=dtype, device=next(base.parameters()).device)
    hybrid.keep_fp32_parameters()  # Mamba's A_log and D stay fp32 in a bf16 hybrid, as from_pretrained keeps them

    state = hybrid.state_dict()
    new_state = {}
    base_state, donor_state = base.state_dict(), donor.state_dict() if donor is not None else {}
    for key, value in state.items():
        parts = key.split(".")
        layer = int(parts[2]) if key.startswith("model.layers.") else None
        if layer is None or letters[layer] == KEEP or parts[3] not in ("mixer", "norm"):
            new_state[key] = base_state[key]  # embeddings, head, final norm, feed-forwards, kept layers
        elif letters[layer] in fresh:
            new_state[key] = base_state[key] if parts[3] == "norm" else value
        elif parts[3] == "norm" and mixer_norm == "base":
            new_state[key] = base_state[key]
        else:
            new_state[key] = donor_state[".".join([*parts[:2], str(sources[layer]), *parts[3:]])]
    hybrid.load_state_dict(new_state, strict=True)
    hybrid.mark_no_weight_decay()
    if base.generation_config is not None:  # the base's eos ids and sampling defaults, as its tokenizer
        hybrid.generation_config = copy.deepcopy(base.generation_config)
    return hybrid.train(base.training)


def _widest_dtype(*models: ZooForCausalLM | None) -> torch.dtype:
    """The dtype every floating-point parameter of `models` (None skipped) converts to without rounding; those kept
    in fp32 whatever the model's dtype (ZooPreTrainedModel.keep_in_fp32_names) stay fp32 anyway and do not count."""
    dtypes = set()
    for m in filter(None, models):
        kept = set(m.keep_in_fp32_names())
        dtypes |= {p.dtype for n, p in m.named_parameters() if p.is_floating_point() and n not in kept}
    return functools.reduce(torch.promote_types, sorted(dtypes, key=str))


def _read_mixers(text: str | None) -> dict[str, dict]:
    """Fresh mixer specs from a YAML/JSON string or a YAML file: {letter: {type: ..., ...}}."""
    import yaml

    if not text:
        return {}
    path = Path(text)
    try:
        is_file = path.is_file()
    except OSError:  # inline YAML longer than a file name may be (ENAMETOOLONG): stat raised, naming no option
        is_file = False
    if not is_file and path.suffix in (".yaml", ".yml", ".json") and "{" not in text:
        raise ValueError(f"--mixers: no such file {text!r}; give a YAML file or inline YAML such as "
                         f"'{{M: {{type: mamba}}}}'")
    data: Any = yaml.safe_load(path.read_text() if is_file else text)
    if isinstance(data, dict) and "mixers" in data and isinstance(data["mixers"], dict):
        data = data["mixers"]
    if not isinstance(data, dict) or not all(isinstance(v, dict) and "type" in v for v in data.values()):
        raise ValueError(f"--mixers: expected {{letter: {{type: ..., ...}}}}, got {data!r}")
    return data


def main(argv: list[str] | None = None) -> None:
    from zoo.convert import load_as_zoo
    from zoo.hub import load_folder_tokenizer, save_model_folder, shard_size

    p = argparse.ArgumentParser(prog="zoo graft", description="Build a hybrid from a Transformer++ (base) and a "
                                "Mamba/Mamba-2 (donor), or give a Transformer++ fresh mixers at chosen layers.")
    p.add_argument("dst", help="folder for the hybrid (a complete model folder with the base's tokenizer)")
    p.add_argument("--base", required=True, help="base model folder (zoo, hf-llama, ...: any format zoo convert reads)")
    p.add_argument("--donor", help="donor model folder (same d_model)")
    p.add_argument("--pattern", required=True, help="one letter per base layer: A keep, M donor, others --mixers")
    p.add_argument("--donor-layers", help="comma-separated donor layer index for each M, in order (default: same)")
    p.add_argument("--mixers", help="fresh mixer specs, YAML/JSON or a YAML file: '{N: {type: mamba2}}'")
    p.add_argument("--mixer-norm", choices=("base", "donor"), default="base",
                   help="pre-mixer RMSNorm of grafted layers (default: the base's)")
    p.add_argument("--seed", type=int, help="seed of fresh mixers (with --mixers; default 0)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="dtype of the saved hybrid (auto: the widest of base and donor, so that no copied weight is "
                   "rounded)")
    p.add_argument("--max-shard-size", default="5GB", type=shard_size,
                   help="safetensors shard size: 5GB, 500MB or a number of bytes (default 5GB)")
    args = p.parse_args(argv)
    if args.donor is not None and DONOR not in args.pattern:  # (the donor was loaded, and nothing taken from it)
        p.error(f"--donor: the pattern {args.pattern!r} has no {DONOR!r}, so no layer would come from the donor; put "
                f"{DONOR} where a donor layer goes, or leave --donor out")
    if args.seed is not None and not args.mixers:  # (the hybrid holds copied weights only: nothing is initialised)
        p.error("--seed seeds the fresh mixers of --mixers; without them it changes nothing, leave it out")
    for name, src in (("--base", args.base), ("--donor", args.donor)):
        if src is not None and Path(src).expanduser().resolve() == Path(args.dst).expanduser().resolve():
            p.error(f"dst {args.dst!r} is the {name} folder; write the hybrid to another folder")
    try:
        donor_layers = [int(x) for x in args.donor_layers.split(",")] if args.donor_layers else None
    except ValueError:
        p.error(f"--donor-layers: expected comma-separated layer indices such as 2,6; got {args.donor_layers!r}")
    base = load_as_zoo(args.base)
    donor = load_as_zoo(args.donor) if args.donor else None
    with warnings.catch_warnings():
        if args.dtype != "auto":  # (the widening warning's advice is what --dtype does)
            warnings.filterwarnings("ignore", message="graft: the hybrid is")
        hybrid = graft(base, args.pattern, donor, mixers=_read_mixers(args.mixers), donor_layers=donor_layers,
                       mixer_norm=args.mixer_norm, seed=args.seed or 0)
    if args.dtype != "auto":
        hybrid = hybrid.to(getattr(torch, args.dtype))
        hybrid.keep_fp32_parameters()  # Mamba's A_log and D stay fp32 in a half hybrid, as from_pretrained keeps them
    out = save_model_folder(hybrid, args.dst, load_folder_tokenizer(args.base), max_shard_size=args.max_shard_size)
    kinds = " ".join(spec["type"] for spec in hybrid.config.layer_specs())
    print(f"wrote {out}: {kinds} ({str(hybrid.dtype).removeprefix('torch.')})")


__all__ = ["graft", "main"]


if __name__ == "__main__":
    main()
