"""What every `zoo eval` command shares: loading a model, running it in chunks, writing result tables.

Evaluation only uses the Hugging Face causal-LM interface (``model(input_ids=..., past_key_values=...,
use_cache=...)``, ``.logits``, the output's cache, ``generate``), so it runs on zoo models and on any
transformers model alike.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import inspect
import io
import json
import math
import os
import signal
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from zoo.cache import output_cache
from zoo.config_files import find_config
from zoo.hub import cached_hub_file, load_causal_lm, tokenizer_source

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


# the seed of a zoo YAML's random weights in load_model: every load of one YAML is the same model
YAML_INIT_SEED = 0


def default_device() -> str:
    """'cuda' when a GPU is visible, else 'cpu'."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(spec: str | torch.device | None, what: str = "--device") -> torch.device:
    """The device a user named (``cpu``, ``cuda``, ``cuda:1``, ...; None or '': `default_device`), or a ValueError
    naming it (as ``what``) when this machine cannot run there: a string torch does not read, ``cuda`` where torch sees
    no GPU, ``cuda:N`` past the GPUs it sees (saying how many), another backend torch finds unavailable, or ``meta``.

    Checked before any model loads: a GPU index past the count went as far as moving the weights, and failed there in
    a traceback ('CUDA error: invalid device ordinal'), as did ``cuda`` on a machine whose driver sees no GPU ('No
    CUDA GPUs are available')."""
    if spec is None or spec == "":  # (an empty --device "$DEVICE" too, as before)
        return torch.device(default_device())
    try:
        device = torch.device(spec)
    except RuntimeError as e:  # (torch's list of the device types it reads)
        raise ValueError(f"{what} {str(spec)!r}: {e}") from None
    if device.type == "meta":
        raise ValueError(f"{what} {str(spec)!r}: the meta device holds no data and runs nothing; give cpu or cuda")
    backend = getattr(torch, device.type, None) if device.type != "cpu" else None
    if backend is None or not hasattr(backend, "is_available") or not hasattr(backend, "device_count"):
        return device  # (a backend torch has no availability check for: moving the weights says what is wrong)
    name = device.type.upper()
    if not backend.is_available():
        if device.type == "cuda":
            # (a ROCm build's torch.version.cuda is None too: its GPUs run as cuda, and it is built for them)
            built = torch.version.cuda is not None or getattr(torch.version, "hip", None) is not None
            why = ("no GPU is visible: check the driver and CUDA_VISIBLE_DEVICES (HIP_VISIBLE_DEVICES on ROCm)" if
                   built else f"this torch ({torch.__version__}) is built without CUDA")
        else:
            why = f"no {name} support in this torch, {torch.__version__}, on this machine"
        raise ValueError(f"{what} {str(spec)!r}: torch sees no {name} device ({why}); give cpu")
    count = backend.device_count()
    if device.index is not None and device.index >= count:
        which = f"{device.type}:0" if count == 1 else f"{device.type}:0 .. {device.type}:{count - 1}"
        raise ValueError(f"{what} {str(spec)!r}: this machine has {count} {name} device{'s' if count != 1 else ''} "
                         f"visible to torch ({which}); give one of them")
    return device


def model_device(model) -> torch.device:
    """The device of the model's parameters (cpu for parameterless stand-ins)."""
    device = getattr(model, "device", None)
    if device is not None:
        return torch.device(device)
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def load_model(path: str, device: str | None = None, dtype: str | None = None):
    """A causal LM from a checkpoint directory or hub id, or a freshly initialised one from a zoo YAML.

    Args:
        path: ``save_pretrained`` directory or hub id, or a zoo YAML config (random weights: smoke runs). A YAML's
            weights are drawn from a fixed seed (``YAML_INIT_SEED``, the global RNG left as it was), so one YAML is
            one model: its results reproduce, and a rerun that resumes by the YAML's text (``model_fingerprint``)
            keeps cells of the same weights.
        device: where to put it; default cuda when available.
        dtype: 'fp32', 'bf16' or 'fp16'; default: the checkpoint's.

    Returns:
        the model, in eval mode, on ``device``.
    """
    from transformers import AutoModelForCausalLM

    import zoo  # noqa: F401  (registers the zoo model type with the transformers Auto classes)

    device = resolve_device(device)  # (before the weights load)
    check_model_path(path)
    torch_dtype = DTYPES[dtype] if dtype else None
    if str(path).endswith((".yaml", ".yml")):
        from zoo.config import ZooConfig

        with torch.random.fork_rng(devices=[]):  # (initialisation runs on the CPU)
            torch.manual_seed(YAML_INIT_SEED)
            model = AutoModelForCausalLM.from_config(ZooConfig.from_yaml(path))
        if torch_dtype is not None:  # as from_pretrained(dtype=...): Mamba's A_log and D stay fp32 in a half model
            model = model.to(torch_dtype)
            model.keep_fp32_parameters()
    else:
        kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
        model = load_causal_lm(path, **kwargs)  # a PEFT adapter (folder or hub repo) through PEFT: DoRA kept
    return model.to(device).eval()


def check_model_path(path: str) -> None:
    """Refuse a ``--model`` that is neither an existing model folder (or PEFT adapter folder) or YAML nor a hub id,
    before anything loads (`zoo.hub.check_model_ref`: ``/nope``, ``runs/x/merged`` with a ``runs/`` folder,
    ``./m``, a missing YAML)."""
    from zoo.hub import check_model_ref

    text = str(path)
    if text.endswith((".yaml", ".yml")):
        try:
            find_config(text, "models")
        except FileNotFoundError as e:
            raise ValueError(f"--model {text}: no such zoo model YAML; give an existing YAML or a packaged "
                             f"configs/models/NAME.yaml ({e})") from None
        return
    try:
        check_model_ref(text, what="--model", adapter_ok=True)
    except ValueError as e:
        raise ValueError(f"{e}; give a save_pretrained folder, a hub id or a zoo model YAML") from None


def load_tokenizer(spec: str | None, model_path: str | None = None):
    """A tokenizer: ``spec`` ('byte' for zoo's byte tokenizer, a path or hub id), else the model's own (a PEFT
    adapter's without tokenizer files: its base model's, `zoo.hub.tokenizer_source`).

    Goes through ``zoo.data.text.load_tokenizer``, so zoo checkpoints saved with the byte tokenizer load it.
    Raises ValueError (``--tokenizer`` is the fix) when the model has no tokenizer of its own.
    """
    from zoo.data.text import load_tokenizer as load

    if spec is None and str(model_path).endswith((".yaml", ".yml")):
        spec = "byte"  # a freshly initialised zoo model has no tokenizer of its own
    if spec is None and model_path is None:
        raise ValueError("load_tokenizer: give a tokenizer name/path or 'byte'")
    # a PEFT adapter without tokenizer files: its base model's tokenizer, as PEFT's users load it (the adapter folder
    # was read for one, and refused as having none)
    name = spec or tokenizer_source(model_path)
    try:
        return load(name)
    except (OSError, ValueError) as error:
        if spec is None:
            reason = " ".join(str(error).split())  # transformers' message spans lines; the CLI prints one
            what = f"{model_path} has no tokenizer" if name == str(model_path) else \
                f"{model_path} is a PEFT adapter without a tokenizer, and its base model {name} has none"
            raise ValueError(f"{what} ({reason}); pass --tokenizer PATH|byte") from None
        raise


def tokenizer_name(spec: str | None, model_path: str) -> str:
    """The tokenizer `load_tokenizer(spec, model_path)` loads, as a message names it: ``--tokenizer 'tok'``, the
    byte tokenizer of a zoo YAML model, ``DIR's tokenizer``, or a PEFT adapter's base model's."""
    if spec is not None:
        return f"--tokenizer {spec!r}"
    if str(model_path).endswith((".yaml", ".yml")):
        return f"the byte tokenizer (a zoo YAML model's, {model_path})"
    source = tokenizer_source(model_path)  # a PEFT adapter without tokenizer files: its base model's
    return f"{model_path}'s tokenizer" if source == str(model_path) else \
        f"the tokenizer of {model_path}'s base model {source}"


def check_tokenizer(model, tokenizer, which: str, fed) -> None:
    """Refuse, before anything is evaluated, a tokenizer that is not the model's, as zoo generate and zoo train do:
    one with more tokens than the model has embeddings, or whose pad, bos or eos id is no row of them (a tokenizer
    whose ids have gaps: ``zoo.data.text.special_id_outside``) where the evaluation feeds it to the model (``fed``: the
    token ids it puts in, or the special ones among them); one it never feeds is warned about (`check_fed_special_ids`,
    zoo generate's rule). ValueError naming it (``which``, `tokenizer_name`) and the fix; nothing is checked for a
    model without input embeddings."""
    try:
        n_embed = model.get_input_embeddings().num_embeddings
    except (AttributeError, NotImplementedError):
        return
    if len(tokenizer) > n_embed:
        raise ValueError(f"{which} has {len(tokenizer)} tokens, more than the model's {n_embed} embeddings; give the "
                         f"tokenizer the model was trained with (--tokenizer)")
    check_fed_special_ids(tokenizer, n_embed, fed, which,
                          lambda name: "give the tokenizer the model was trained with (--tokenizer)")


def check_fed_special_ids(tokenizer, n_embed: int, fed, which: str, fix) -> None:
    """Refuse (ValueError: ``which``, why, then ``fix(name)``) a pad, bos or eos id of the tokenizer that is no row of
    the model's ``n_embed`` embeddings (`zoo.data.text.special_id_outside`) and is one of the ids ``fed`` to the model:
    the embedding would fail on it ('IndexError: index out of range in self'). One that is not fed (an unused pad, an
    eos the model never generates, as no logit stands for it) is warned about: refusing it left such a tokenizer unable
    to run at all, though nothing would reach the embedding."""
    import warnings

    from zoo.data.text import SPECIAL_IDS, special_id_outside

    for name in SPECIAL_IDS:
        if (outside := special_id_outside(tokenizer, n_embed, names=(name,))) is None:
            continue
        if getattr(tokenizer, name) in fed:
            raise ValueError(f"{which}: {outside[0]}; {fix(name)}")
        warnings.warn(f"{which}: {outside[0]}; this run does not feed it to the model"
                      f"{', and the model never generates it' if name == 'eos_token_id' else ''}", stacklevel=2)


def check_positions(model, tokens: int, what: str, fix) -> None:
    """Refuse (ValueError: ``what``, then ``fix(positions)``) running ``tokens`` positions through a model of learned
    absolute position embeddings with fewer rows (`zoo.train.position_table`: GPT-2's wpe, OPT's embed_positions):
    the position past them failed in that embedding, 'IndexError: index out of range in self', naming nothing (on a
    GPU, a device-side assert). Rotary, ALiBi and zoo models have no such table: nothing is checked for them."""
    from zoo.train import position_table

    if (table := position_table(model)) is not None and tokens > table[1]:
        raise ValueError(f"{what}, but {type(model).__name__} learns {table[1]} absolute positions ({table[0]}, config "
                         f"max_position_embeddings); {fix(table[1])}")


def check_token_ids(model, token_ids: torch.Tensor | Sequence[torch.Tensor], what: str, fix: str) -> None:
    """Refuse token ids outside ``[0, model.config.vocab_size)`` with a ValueError naming ``what`` and ``fix``
    (the embedding would raise a bare ``IndexError: index out of range in self`` mid-evaluation).

    Args:
        model: a causal LM; nothing is checked when it has no ``config.vocab_size``.
        token_ids: LongTensor of any shape, or a sequence of them (documents).
        what: the ids' source, e.g. 'the --tokens documents'.
        fix: what to change, e.g. 'tokenize with the model's tokenizer'.
    """
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    pieces = [token_ids] if isinstance(token_ids, torch.Tensor) else list(token_ids)
    pieces = [t for t in pieces if t.numel()]
    if vocab_size is None or not pieces:
        return
    top, bottom = max(int(t.max()) for t in pieces), min(int(t.min()) for t in pieces)
    if top >= vocab_size or bottom < 0:
        bad = top if top >= vocab_size else bottom
        raise ValueError(f"{what} hold token id {bad} but the model's vocab_size is {vocab_size}; {fix}")


def encode_with_bos(tokenizer, text: str, add_bos: bool = True) -> list[int]:
    """``tokenizer.encode(text)`` as a list, with the BOS token in front when the tokenizer has one and did
    not add it (zoo models train on ``<bos>`` + text), and without an EOS token the tokenizer appended (one set to
    ``add_eos_token``): this is a prompt to continue, and after an EOS the model starts a new document.
    add_bos False (a model trained with data.add_bos false; `trained_with_bos`): no BOS, one the tokenizer added
    dropped, as that training encoded its documents."""
    ids = tokenizer.encode(text)
    if hasattr(ids, "input_ids"):
        ids = ids.input_ids
    ids = ids.reshape(-1).tolist() if isinstance(ids, torch.Tensor) else list(ids)
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and eos != bos and ids and ids[-1] == eos:
        eos_text = getattr(tokenizer, "eos_token", None)
        if not (isinstance(eos_text, str) and eos_text and text.rstrip().endswith(eos_text)):  # not in the text
            ids = ids[:-1]
    if bos is not None and not add_bos and ids and ids[0] == bos:
        bos_text = getattr(tokenizer, "bos_token", None)
        if not (isinstance(bos_text, str) and bos_text and text.lstrip().startswith(bos_text)):  # not in the text
            ids = ids[1:]
    elif bos is not None and add_bos and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids


def trained_with_bos(config) -> bool:
    """Whether a model's documents started with the tokenizer's BOS in training: False where zoo train or zoo
    finetune recorded data.add_bos false in its config (``add_bos``), else True (zoo models train on ``<bos>`` +
    text)."""
    return getattr(config, "add_bos", True) is not False


def accepts_argument(model, name: str) -> bool:
    """Whether ``model.forward`` takes keyword ``name`` (e.g. ``logits_to_keep``)."""
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def iter_chunk_logits(
    model, input_ids: torch.Tensor, chunk_size: int | None = None
) -> Iterator[tuple[int, torch.Tensor]]:
    """Run ``input_ids`` through ``model`` in consecutive chunks, carrying the model's cache between them.

    Uses the generic Hugging Face API: ``out = model(input_ids=chunk, past_key_values=cache,
    use_cache=True)``; ``cache = out.past_key_values``. A recurrent model therefore needs constant memory
    in the sequence length; an attention model keeps its KV cache. Call under ``torch.no_grad()``.

    Args:
        model: a causal LM.
        input_ids: LongTensor [B, T] on the model's device.
        chunk_size: tokens per forward; None or >= T runs one forward without a cache.

    Yields:
        ``(start, logits)`` with logits [B, c, V] for positions ``start .. start + c - 1``.
    """
    from zoo.decode import _dict_output, cache_argument, continues_chunks_exactly

    seq_len = input_ids.shape[1]
    # an output object also where the config's return_dict is False (transformers' option, for exports): its tuple has
    # no .logits
    output = _dict_output(model)
    if chunk_size is None or chunk_size >= seq_len:
        yield 0, model(input_ids=input_ids, use_cache=False, **output).logits
        return
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")

    if not continues_chunks_exactly(model):
        raise ValueError(f"{type(model).__name__} cannot continue a multi-token chunk from its cache exactly; "
                         f"evaluate it with one full forward per document: chunk_size=None, or a chunk_size of at "
                         f"least the document length (--chunk-size {seq_len} or more)")
    arg = cache_argument(model)
    cache = None
    for start in range(0, seq_len, chunk_size):
        chunk = input_ids[:, start : start + chunk_size]
        out = model(input_ids=chunk, use_cache=True, **{arg: cache}, **chunk_positions(model, chunk, start), **output)
        cache = output_cache(out, arg)
        yield start, out.logits


def chunk_positions(model, chunk: torch.Tensor, start: int) -> dict:
    """``{"position_ids": [[start .. start + c - 1]]}`` for a chunk [B, c] that continues a cache of ``start`` tokens,
    where ``model.forward`` takes position_ids; ``{}`` for the first chunk (every model counts from 0 there).

    Some transformers models do not count a chunk's positions on from the cache: Bamba takes ``arange(c)`` when no
    position_ids come (generate passes them), so every later chunk's attention had the RoPE positions of a document's
    start (per-position losses 3.6e-3 off the one-forward ones on a tiny Bamba, silently).
    """
    if start == 0 or not accepts_argument(model, "position_ids"):
        return {}
    positions = torch.arange(start, start + chunk.shape[1], device=chunk.device)
    return {"position_ids": positions.expand(chunk.shape[0], -1)}


def write_rows(rows: Sequence[dict], path: str | Path) -> Path:
    """Write ``rows`` (same keys) as CSV to ``path`` (suffix .csv); returns the path. Written beside it and renamed
    over it (``write_text_atomically``): the evaluations rewrite their CSV after every cell, and one written in place
    lost the finished cells' rows to an interruption mid-write (a header, or half a row, left)."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(rows[0]) if rows else [])
    writer.writeheader()
    writer.writerows(rows)
    return write_text_atomically(text.getvalue(), path)


def write_json(obj, path: str | Path) -> Path:
    """Write ``obj`` as indented JSON to ``path``; returns the path. A NaN or infinite float (the loss of a one-token
    row, an accuracy of an empty cell) is written as null: Python's json wrote a bare ``NaN``, which strict readers
    (jq, JavaScript, pandas' default) refuse. Written to a temporary file beside ``path``, then renamed over it: an
    interruption leaves the old file or the new one, never a truncated one that a rerun's resume cannot read."""
    def finite(value):
        if isinstance(value, float):
            return value if math.isfinite(value) else None
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(v) for v in value]
        return value

    return write_text_atomically(json.dumps(finite(obj), indent=2, allow_nan=False) + "\n", path)


def write_text_atomically(text: str, path: str | Path) -> Path:
    """Write ``text`` to a temporary file beside ``path`` (its folder made), then rename it over ``path``: an
    interruption leaves the old file or the new one, never a truncated one; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    try:
        temporary.write_text(text, newline="")  # as given: a CSV's \r\n line ends are not translated again
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)  # (an interrupted write's; gone after the rename)
    return path


def model_fingerprint(path: str) -> dict | str:
    """What identifies ``--model``'s weights for a resumed run: size and modification time of each file of a local
    folder (so weights retrained into the same folder are not taken for the old ones), a YAML's text; for a hub id,
    the commit its local copy was downloaded at (so a repository updated since is not taken for the old weights),
    else the id alone (not downloaded yet). A PEFT adapter (folder or hub id) adds its base model's fingerprint
    (``base``): the model evaluated is the base with the adapter, and a base retrained or updated under the same name
    is another model."""
    local = Path(path).expanduser()
    if local.is_dir():
        files = {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(local.iterdir()) if f.is_file()}
        adapter = local / "adapter_config.json"
        return {"adapter": files, "base": _base_fingerprint(adapter, local)} if adapter.is_file() else files
    if str(path).endswith((".yaml", ".yml")):  # a file, or a packaged config by name (as load_model reads it)
        return find_config(local, "models").read_text()
    commit = hub_commit(str(path))
    if commit is not None:
        return {"hub": str(path), "commit": commit}
    adapter = cached_hub_file(str(path), "adapter_config.json")
    if adapter is None:
        return str(path)
    return {"hub": str(path), "commit": adapter.parent.name, "base": _base_fingerprint(adapter, None)}


def tokenizer_fingerprint(tokenizer) -> str:
    """What identifies a loaded tokenizer for a resumed run, by what it turns text into (not by its name or folder): a
    SHA-256 of its class, its special token ids, whether it adds BOS / EOS, and its whole tokenizers pipeline
    (vocabulary, merges, normalizer, pre-tokenizer: ``backend_tokenizer``; a slow tokenizer: its vocabulary). The same
    files loaded again give the same one; another tokenizer saved into the same folder gives another. The pipeline's
    padding and truncation are left out: the settings of the tokenizer's last call with padding or truncation, which
    changed the digest of the same tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pipeline = sorted(tokenizer.get_vocab().items())
    if backend is not None:
        pipeline = json.loads(backend.to_str())
        pipeline.pop("padding", None)
        pipeline.pop("truncation", None)
    what = {"class": type(tokenizer).__name__,
            "special": {name: getattr(tokenizer, name, None)
                        for name in ("pad_token_id", "bos_token_id", "eos_token_id", "unk_token_id")},
            "adds": [getattr(tokenizer, "add_bos_token", None), getattr(tokenizer, "add_eos_token", None)],
            "pipeline": pipeline}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def _base_fingerprint(adapter_config: Path, folder: Path | None) -> dict | str | None:
    """model_fingerprint of the base model an adapter_config.json names (None when it names none, or names the
    adapter's own folder)."""
    try:
        base = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    if not base or (folder is not None and Path(base).expanduser().resolve() == folder.resolve()):
        return None
    return model_fingerprint(base)


def hub_commit(repo_id: str) -> str | None:
    """The commit of the hub model ``repo_id`` whose files the local Hugging Face cache holds for its main revision
    (what from_pretrained loads offline), or None when none is cached; no network."""
    found = cached_hub_file(repo_id, "config.json")
    return found.parent.name if found is not None else None  # <cache>/snapshots/<commit>/config.json


def resume(path: str | Path, config: dict, what: str) -> dict | None:
    """The result saved at ``path`` (JSON) when its ``config`` equals ``config``, so a rerun skips its finished
    cells; None when there is none, or (with a note naming the settings that differ) when it came from other
    settings, which this run then replaces rather than mixing its cells with theirs."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    config = json.loads(json.dumps(config))  # as it reads back (tuples as lists)
    previous = saved.get("config") if isinstance(saved, dict) else None
    if previous == config:
        print(f"{what}: resuming {path}: its finished cells are kept (delete it, or give another --out, to rerun "
              f"them)")
        return saved
    if not isinstance(previous, dict):
        print(f"{what}: {path} does not record the settings of its results; they are replaced, not resumed")
        return None
    differ = sorted(k for k in set(config) | set(previous) if previous.get(k) != config.get(k))
    print(f"{what}: {path} holds results of other settings ({', '.join(differ)} differ); they are replaced, not "
          f"resumed")
    return None


def tokens_digest(rows: torch.Tensor | Sequence[torch.Tensor]) -> str:
    """SHA-256 of token rows (a tensor [N, T] or a list of [T_i]), in order: what a partial run was run on."""
    digest = hashlib.sha256()
    for row in (rows.unbind(0) if isinstance(rows, torch.Tensor) else rows):
        ids = row.reshape(-1).long().cpu().contiguous()
        digest.update(len(ids).to_bytes(8, "little"))
        digest.update(ids.numpy().tobytes())
    return digest.hexdigest()


def read_partial(path: str | Path, settings: dict, label: str, safe_globals: Sequence[type] = (),
                 map_location: str | torch.device | None = None) -> dict | None:
    """The partial run saved at ``path`` (``save_atomically``) when it was saved under ``settings``; None (saying why)
    when there is none, or it is unreadable or of other settings (the run then starts over and replaces it).
    ``safe_globals``: the classes it may hold besides tensors and plain values (a model's cache). ``map_location``:
    where its tensors are loaded (torch.load's; None: where they were saved), for a caller whose saved tensors are on
    the model's device (a cache) and whose settings name that device: a file saved on a GPU is then read on a machine
    without one, and refused as of another device, not as unreadable."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            saved = torch.load(path, weights_only=True, map_location=map_location)
        previous = saved["settings"]
        if not isinstance(previous, dict) or not isinstance(previous.get("key"), dict):
            raise TypeError
    except Exception as error:  # a truncated or foreign file: nothing to resume
        print(f"{label}: {path} is not a readable partial run ({type(error).__name__}); starting over")
        return None
    if previous == settings:
        return saved
    differ = {k for k in set(settings) | set(previous) if previous.get(k) != settings.get(k)}
    if "key" in differ:  # the caller's settings that differ, by name
        differ = (differ - {"key"}) | {k for k in set(settings["key"]) | set(previous["key"])
                                       if previous["key"].get(k) != settings["key"].get(k)}
    differ = sorted(differ)
    print(f"{label}: {path} holds a partial run of other settings ({', '.join(differ)} differ); starting over")
    return None


def rekey_partial(path: str | Path, earlier: dict, key: dict, safe_globals: Sequence[type] = ()) -> None:
    """A partial run saved at ``path`` under the caller's settings ``earlier`` (its ``settings["key"]``, as
    `read_partial` compares it) is saved under ``key`` instead, the rest of its settings as they were: for a caller
    whose key dropped settings the run does not depend on, so that a run an earlier version interrupted resumes (it was
    of other settings, and started over). Nothing where there is no such file, or one under another key."""
    earlier, key = json.loads(json.dumps(earlier)), json.loads(json.dumps(key))
    path = Path(path)
    if earlier == key or not path.is_file():
        return
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            saved = torch.load(path, weights_only=True)
        settings = saved["settings"]
    except Exception:  # (read_partial says why, and starts over)
        return
    if isinstance(settings, dict) and settings.get("key") == earlier:
        save_atomically({**saved, "settings": {**settings, "key": key}}, path)


def save_atomically(obj, path: str | Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then renamed over it: an interruption leaves the old file
    or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    torch.save(obj, temporary)
    os.replace(temporary, path)


def remove_partial(path: str | Path) -> None:
    """Delete a finished run's partial file, and the temporary file of a save that was interrupted."""
    path = Path(path)
    for file in (path, path.with_name(path.name + ".tmp")):
        file.unlink(missing_ok=True)


@contextlib.contextmanager
def sigterm_interrupts(name_signal: bool = False) -> Iterator[None]:
    """SIGTERM (`timeout`'s, a scheduler's) raises KeyboardInterrupt inside the block, as Ctrl-C does, so that an
    evaluation stopped either way ends alike: its finished documents' partial file kept, one line saying so, exit
    status 130 (zoo.cli._run). Outside the main thread (no signal handler can be set there) it changes nothing; a
    handler set inside the block (zoo.train's, which saves and stops) takes precedence while it is set. With
    `name_signal` the KeyboardInterrupt says "signal 15" (the benchmarks note which of the two cut a run short); without
    it, it is bare, for `interruption_says` to fill. The one implementation: benchmarks/ceilings.py,
    benchmarks/generate.py and benchmarks/train_throughput.py use it too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}") if name_signal else KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def interruption_says(message: str) -> Iterator[None]:
    """A bare KeyboardInterrupt (Ctrl-C, or SIGTERM under `sigterm_interrupts`) inside the block is raised again with
    `message` (what is kept, how to go on), the line zoo.cli._run prints; one that says something already is kept."""
    try:
        yield
    except KeyboardInterrupt as e:
        if str(e):
            raise
        raise KeyboardInterrupt(message) from None


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None, digits: int = 4) -> str:
    """Rows of dicts as a markdown table; floats rounded to ``digits``."""
    if not rows:
        return ""
    columns = list(columns or rows[0])

    def cell(value) -> str:
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def format_size(n: int) -> str:
    """A token count for a label: 1024 -> '1K', 2**20 -> '1M', 1000 -> '1000' (K = 1024, M = 1024**2, as
    ``parse_int`` reads them)."""
    for unit, size in (("M", 1024**2), ("K", 1024)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def pyplot():
    """matplotlib.pyplot on the Agg backend: the evaluations write PNG files and never open a window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (its folder made) at 150 dpi, laid out tight, and close it; returns the
    path."""
    plt = pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def parse_list(text: str, kind=int) -> list:
    """'64,128,256' -> [64, 128, 256]; accepts 2^k and 1K/1M suffixes for integers."""
    values = []
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        if kind is int:
            values.append(parse_int(item))
        else:
            values.append(kind(item))
    return values


def number_list(text: str, kind=int) -> list:
    """``parse_list`` as an argparse type (--seq-lens, --n-kv, --lengths; ``kind=float`` for --depths): an item that
    is not a number is refused with argparse's one-line error naming the option (int()'s own message named neither
    the option nor the forms it takes)."""
    try:
        return parse_list(text, kind)
    except ValueError:
        forms = "integers such as 64,2^8,4K" if kind is int else "numbers such as 0,0.25,1"
        raise argparse.ArgumentTypeError(f"expected a comma list of {forms}, got {text!r}") from None


def int_option(text: str) -> int:
    """``parse_int`` as an argparse type (zoo eval state --norm-calibrate): a value that is not an integer is refused
    with argparse's one-line error naming the option and the forms it takes. (argparse words a bare ValueError as
    'invalid <function name> value': "argument --norm-calibrate: invalid parse_int value: 'abc'".)"""
    try:
        return parse_int(text)
    except ValueError as error:
        reason = str(error) if str(error).startswith("invalid integer") else f"invalid integer {text!r}"
        raise argparse.ArgumentTypeError(f"{reason}; give a whole number such as 2048, 2^11 or 2K") from None


def positive_int(text: str) -> int:
    """``parse_int`` for a count or size on the command line (rows, batch, chunk, tokens): below 1 is refused with
    argparse's one-line error naming the option (0 rows divided by zero, a 0 batch or chunk stalled a range), and so
    is a value that is not an integer (`int_option`)."""
    value = int_option(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0 on the command line (a warmup, --points-per-octave: 0 is none; a negative count was taken as 0
    without a word); a value that is not an integer is refused as such ('invalid non_negative_int value' before)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}; give a whole number such as 0 or 2") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def parse_int(item: str) -> int:
    """'4096', '2^12', '4K', '1M' -> int (K = 1024, M = 1024**2)."""
    item = item.strip()
    if not item:  # (an empty value, e.g. an unset "$LEN", failed as a bare IndexError)
        raise ValueError("invalid integer '': an empty value")
    if "^" in item:
        base, exponent = item.split("^")
        if int(exponent) < 0:  # int ** negative is a float: '2^-1' gave 0.5 tokens
            raise ValueError(f"invalid integer {item!r}: a negative exponent")
        return int(base) ** int(exponent)
    scale = {"k": 1024, "m": 1024**2}.get(item[-1].lower())
    return int(item[:-1]) * scale if scale else int(item)


def add_device_arguments(parser) -> None:
    """The eval tools' --device and --dtype options (resolve_device reads the first; the model loaders the second)."""
    parser.add_argument("--device", default=None,
                        help="where to run, e.g. cpu, cuda, cuda:1 (default: cuda when a GPU is visible)")
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                        help="the weights' dtype (default: the checkpoint's; a zoo model YAML's fresh weights: fp32)")
