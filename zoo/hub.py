"""Complete Hugging Face model folders: what any client that only knows transformers needs to load a zoo model.

A folder holds config.json, model.safetensors (sharded with model.safetensors.index.json when larger than
`max_shard_size`), generation_config.json with the tokenizer's special ids, and the tokenizer files, so
that after `import zoo`

    AutoModelForCausalLM.from_pretrained(folder); AutoTokenizer.from_pretrained(folder)
    pipeline("text-generation", model=folder)

work offline. The built-in byte tokenizer is saved as tokenizer.json (a `tokenizers` byte-level model).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# every file a tokenizer's save_pretrained may write: a save with a tokenizer replaces the whole set
TOKENIZER_FAMILY = frozenset(_TOKENIZER_FILES + ("vocab.txt", "merges.txt", "special_tokens_map.json",
                                                 "added_tokens.json", "chat_template.jinja", "chat_template.json"))
# weights and their shard index, as transformers names them (model-00001-of-00002.safetensors, pytorch_model.bin, ...)
_WEIGHT_FILE = re.compile(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?")


def holds_weights(folder: str | Path) -> bool:
    """Whether the folder `folder` holds a model's weights as from_pretrained finds them: a safetensors file, or a
    pytorch_model.bin (or its shards' index)."""
    return any(p.suffix == ".safetensors" or _WEIGHT_FILE.fullmatch(p.name) for p in Path(folder).iterdir())


def holds_tokenizer(folder: str | Path) -> bool:
    """Whether the folder `folder` holds tokenizer files (any of `_TOKENIZER_FILES`): what zoo train, zoo finetune and
    an adapter's tokenizer lookup take as a model folder's own tokenizer."""
    return any((Path(folder) / name).is_file() for name in _TOKENIZER_FILES)


def load_folder_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase | None:
    """'byte' -> the built-in byte tokenizer; a folder with tokenizer files -> its tokenizer; a folder without
    any -> None; any other name -> `AutoTokenizer.from_pretrained(name)`."""
    from transformers import AutoTokenizer

    from zoo.data.text import ByteTokenizer

    if str(name_or_path) == "byte":
        return ByteTokenizer()
    path = Path(name_or_path).expanduser()  # '~/tok' from a config file or a quoted argument: transformers took it
    if not path.is_dir():
        check_tokenizer_ref(name_or_path)
        return AutoTokenizer.from_pretrained(str(name_or_path))
    if not holds_tokenizer(path):
        return None
    config_file = path / "tokenizer_config.json"
    try:
        tokenizer_class = json_object(config_file).get("tokenizer_class") if config_file.is_file() else None
        if tokenizer_class == "ByteTokenizer":
            return ByteTokenizer.from_pretrained(path)
        return AutoTokenizer.from_pretrained(path)
    except json.JSONDecodeError as e:  # json's message named no file (tokenizer.json, special_tokens_map.json, ...)
        for name in sorted(TOKENIZER_FAMILY):
            if name.endswith(".json") and (path / name).is_file():
                json_object(path / name)
        raise ValueError(f"{path}: a tokenizer file is not valid JSON ({e})") from None


def json_object(path: Path, what: str = "the JSON object of a tokenizer file",
                fix: str = "give a tokenizer folder whose files its library wrote") -> dict:
    """The JSON object in the file `path`; ValueError naming the file where it is no valid JSON or holds another value
    (`what` it should be, `fix` the advice): a tokenizer_config.json or a config.json holding a list ended in an
    AttributeError traceback, invalid JSON in json's message naming no file."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); {fix}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: holds a JSON {type(data).__name__}, not {what}; {fix}")
    return data


@contextlib.contextmanager
def peft_wrapping():
    """Around PEFT's wrapping of a model (get_peft_model, PeftModel.from_pretrained): PEFT 0.21 reads the model's
    `is_gradient_checkpointing`, which transformers 5.2x deprecates with a FutureWarning naming
    `is_activation_checkpointing`; zoo finetune printed it at every run, as if zoo called the old name. That warning
    alone is hidden, and only here: a user's own call of the old name still warns."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def peft_layer(model: Any) -> str | None:
    """The name of the first module of the nn.Module `model` that PEFT put there (an adapter's layer: a PeftModel's base
    model, or what load_causal_lm made of an adapter), None when it holds none."""
    return next((name for name, module in model.named_modules() if type(module).__module__.startswith("peft")), None)


def require_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    """`load_folder_tokenizer` for a tokenizer the user named (a --tokenizer, save_model_folder's `tokenizer`): a
    folder without tokenizer files raises ValueError. Its None read as "no tokenizer", and the model was saved without
    one (into an existing folder, beside the tokenizer files of an earlier save) without an error."""
    tokenizer = load_folder_tokenizer(name_or_path)
    if tokenizer is None:
        raise ValueError(f"tokenizer: {str(name_or_path)!r} is a folder without tokenizer files (none of "
                         f"{', '.join(_TOKENIZER_FILES)}); give 'byte', a tokenizer folder or a hub id")
    return tokenizer


_SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}  # huggingface_hub's, which save_pretrained reads


def shard_size(value: str) -> int | str:
    """A --max-shard-size argument as save_pretrained takes it: '5GB' / '500MB' as given, a plain number as bytes.

    A size save_pretrained cannot read is argparse's error at once (save_pretrained refused it only once the model was
    loaded and converted), and so is one under a byte (it wrote one file per tensor)."""
    import argparse
    import math

    text = value.strip()
    try:
        size = float(text) if text.isdigit() else float(text[:-2]) * _SIZE_UNITS[text[-2:].upper()]
        if not math.isfinite(size):
            raise ValueError(size)
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"{value!r} is not a size: give a number of bytes or one with a unit, KB, "
                                         f"MB, GB or TB, such as 5GB or 500MB") from None
    if size < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: a shard holds at least one byte (a size under one wrote a file "
                                         f"per tensor)")
    return int(text) if text.isdigit() else value


def save_model_folder(model: PreTrainedModel, folder: str | Path, tokenizer: Any = None, *,
                      max_shard_size: int | str = "5GB") -> Path:
    """Write `model` (and `tokenizer`: an object with `save_pretrained`, 'byte', or a folder) as a complete
    model folder; returns the folder.

    The tokenizer's pad/bos/eos ids fill the model config's and generation config's unset ones, so
    `generate` and pipelines stop and pad as the tokenizer expects. Raises ValueError when the tokenizer has
    more tokens than the model's vocabulary, and when the model holds PEFT adapter layers (merge them first). Into an
    existing folder, the weight files of an earlier save are
    replaced (none is left beside the new ones), and its tokenizer files when a tokenizer is given (without one
    they stay, with a warning); its other files stay.
    """
    folder = Path(folder).expanduser()  # ('~/out' from a quoted argument: a folder named '~' in the cwd)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{str(folder)!r} is a file; give a folder to write the model to")
    # a PeftModel's base model, or what load_causal_lm made of an adapter: save_pretrained wrote the adapted modules'
    # weights as base_layer / lora_A / lora_B, which from_pretrained does not load (they came back newly initialized)
    wrapped = peft_layer(model)
    if wrapped is not None:
        raise ValueError(f"the model holds PEFT adapter layers ({wrapped}, ...), whose weights a saved model folder "
                         f"would keep under names from_pretrained does not load (the adapted modules would come back "
                         f"newly initialized); merge them first: merge_and_unload() of the PeftModel (of an adapter "
                         f"folder or hub id: PeftModel.from_pretrained(base model, adapter).merge_and_unload()), or "
                         f"save the adapter alone with the PeftModel's save_pretrained")
    if isinstance(tokenizer, (str, Path)):
        tokenizer = require_tokenizer(tokenizer)
    # (a model that does not generate, ZooForSequenceClassification or ZooModel, has no generation_config in
    # transformers 5: reading it raised AttributeError)
    config, generation = model.config, getattr(model, "generation_config", None)
    if tokenizer is not None and len(tokenizer) > config.vocab_size:
        raise ValueError(f"tokenizer: {len(tokenizer)} tokens do not fit the model's vocab_size "
                         f"{config.vocab_size}; choose a tokenizer with at most that many tokens")
    fill_special_ids(model, tokenizer)

    def write(target: Path) -> None:
        model.save_pretrained(target, max_shard_size=max_shard_size)
        if generation is not None and not (target / "generation_config.json").is_file():
            generation.save_pretrained(target)

    return write_folder(folder, write, tokenizer)


def fill_special_ids(model: PreTrainedModel, tokenizer: Any = None) -> None:
    """Fill the model config's unset pad/bos/eos ids from `tokenizer` (None: none), then its generation config's unset
    ones from the model config, so that `generate` stops and pads as the tokenizer expects."""
    from zoo.data.text import SPECIAL_IDS

    config, generation = model.config, getattr(model, "generation_config", None)
    if tokenizer is not None:
        for name in SPECIAL_IDS:
            value = getattr(tokenizer, name, None)
            if value is not None and getattr(config, name, None) is None:
                setattr(config, name, value)
    if generation is not None:
        for name in SPECIAL_IDS:
            if getattr(generation, name, None) is None and getattr(config, name, None) is not None:
                setattr(generation, name, getattr(config, name))


def check_save_folder(folder: str | Path) -> None:
    """Raise ValueError where a model saved into the folder `folder` (by `write_folder`) would be loaded wrong or
    would replace files of something else: a folder holding a PEFT adapter (transformers would apply it to the model
    written there), or a config.json that is not a model's (no model_type, nor mamba_ssm's d_model and n_layer: a
    project's or a tool's, or no JSON object at all), which the save replaced without a word. A folder of no such file
    (a new one, an earlier save's, one of other files) is written into."""
    folder = Path(folder).expanduser()
    if (folder / "adapter_config.json").is_file():
        raise ValueError(f"{folder} holds a PEFT adapter (adapter_config.json): transformers' from_pretrained loads an "
                         f"adapter it finds in a model's folder on top of that model, so the model saved here would "
                         f"load with the adapter's changes; save it to another folder, or delete the adapter's files")
    config = folder / "config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text())
        except (OSError, ValueError):  # (invalid JSON, or not text)
            data = None
        if not (isinstance(data, dict) and ("model_type" in data or {"d_model", "n_layer"} <= set(data))):
            raise ValueError(f"{folder} holds a config.json that is not a model's config (no model_type, nor "
                             f"mamba_ssm's d_model and n_layer), which the model saved here would replace; save it to "
                             f"another folder (a new one, or an earlier save's), or move that config.json out")


def write_folder(folder: str | Path, write: Callable[[Path], None], tokenizer: Any = None) -> Path:
    """Write a folder through `write(target)` (and `tokenizer.save_pretrained`) beside `folder`, then move it in:
    a new folder appears only when complete; into an existing one, the weight files `write` did not write go (and
    its tokenizer files when `tokenizer` is given; without one they stay, with a warning), other files stay. A folder
    holding a PEFT adapter or a config.json not of a model is refused (`check_save_folder`)."""
    folder = Path(folder).expanduser()
    check_save_folder(folder)  # (before anything is written)
    # the folder is written beside it and renamed into place: a save that fails (a bad max_shard_size, a full
    # disk, an interrupt) used to leave a partly written folder that from_pretrained and --resume took for a model
    target = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(target, ignore_errors=True)  # a killed save's, by a process with this pid: its files are not ours
    try:
        write(target)
        if tokenizer is not None:
            tokenizer.save_pretrained(target)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    if not folder.is_dir():
        os.replace(target, folder)
        return folder
    # into an existing folder: weight files of an earlier save go (a stale model.safetensors beside new shards was
    # what from_pretrained loaded: the old model, silently), and so do its tokenizer files when this save has a
    # tokenizer (an old tokenizer.model or vocab.json beside new files is what a slow tokenizer loads); other files
    # stay
    kept_tokenizer = []
    for old in folder.iterdir():
        if (target / old.name).exists():
            continue
        if _WEIGHT_FILE.fullmatch(old.name) or (tokenizer is not None and old.name in TOKENIZER_FAMILY):
            old.unlink()
        elif old.name in TOKENIZER_FAMILY:
            kept_tokenizer.append(old.name)
    if kept_tokenizer:
        warnings.warn(f"{folder}: this save has no tokenizer, so the folder keeps the tokenizer files of an earlier "
                      f"save ({', '.join(sorted(kept_tokenizer))}), and loading the folder (load_model_folder, zoo "
                      f"generate) takes that tokenizer; give a tokenizer (zoo convert --tokenizer) to replace them, "
                      f"or delete them if they do not belong to this model", stacklevel=2)
    for new in target.iterdir():
        os.replace(new, folder / new.name)
    target.rmdir()
    return folder


def check_model_ref(ref: str | Path, what: str = "model", adapter_ok: bool = False) -> None:
    """Raise ValueError when `ref` names a local model folder that is not there (or not a model folder).

    `ref` is a local path by `is_local_ref`; anything else may be a hub id ('org/name') and is left to
    transformers. Without this check transformers reports a missing folder as an invalid repo id or, offline,
    as a failed connection to the hub. adapter_ok: a PEFT adapter folder (adapter_config.json) passes too."""
    text = str(ref)
    path = Path(text).expanduser()
    if path.is_dir():
        adapter = (path / "adapter_config.json").is_file()
        if (path / "config.json").is_file() or (adapter and adapter_ok):
            return
        # PEFT's save_pretrained writes an adapter named other than 'default' into a subfolder of that name, and a zoo
        # finetune run folder holds adapter/ and merged/: it was 'a folder but not a model folder', no word of them
        models = sorted(found.parent.name for found in path.glob("*/config.json"))
        adapters = sorted(found.parent.name for found in path.glob("*/adapter_config.json"))
        if (models or adapters) and not adapter:
            held = " and ".join(f"{kind} ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})"
                                for kind, names in (("models", models), ("PEFT adapters", adapters)) if names)
            usable = models + (adapters if adapter_ok else [])
            fix = f"give one of them, such as {str(Path(text) / usable[0])!r}" if usable else \
                "give their base model or the merged model"
            raise ValueError(f"{what}: {text!r} is a folder but not a model folder (no config.json); its subfolders "
                             f"hold {held}: {fix}")
        raise ValueError(_adapter_not_model(what, text) if adapter else f"{what}: {text!r} is a folder but not a "
                         f"model folder (no config.json)")
    if path.exists():
        raise ValueError(f"{what}: {text!r} is a file; give a model folder (config.json and weights) or a hub id")
    if is_local_ref(text):
        raise ValueError(f"{what}: {text!r}: no such model folder")


# the weights files a model's (or a PEFT adapter's) folder holds, which a reader of its weights may fail on
_WEIGHTS_READ = re.compile(r"(model|pytorch_model|adapter_model)(-\d+-of-\d+)?\.(safetensors|bin)")
_LFS_POINTER = b"version https://git-lfs.github.com/spec/"
# the modules of torch.load, whose failures on a file that is no checkpoint are of no one type (pickle's
# UnpicklingError, but a KeyError, IndexError or UnicodeDecodeError of its unpickler on text, a RuntimeError "Invalid
# magic number" on a pickle of something else, ...)
_TORCH_LOAD_FILES = ("serialization.py", "_weights_only_unpickler.py")


def _raised_reading(error: BaseException) -> bool:
    """Whether `error` is a failure of reading a weights file: safetensors' or pickle's error, or any error that
    torch.load raised (its traceback passes through torch's serialization modules)."""
    import pickle

    import torch
    from safetensors import SafetensorError

    if isinstance(error, (SafetensorError, pickle.UnpicklingError, EOFError)):
        return True
    torch_dir = Path(torch.__file__).parent
    tb = error.__traceback__
    while tb is not None:
        path = Path(tb.tb_frame.f_code.co_filename)
        if path.name in _TORCH_LOAD_FILES and path.parent == torch_dir:
            return True
        tb = tb.tb_next
    return False


def _unreadable(path: Path) -> str | None:
    """Why the weights file `path` cannot be read ("lfs": it is a Git LFS pointer), None where it can: a safetensors
    file's header is read, a .bin is loaded as from_pretrained loads it (torch.load(weights_only=True); memory-mapped
    when of torch's zip format, so that a good file costs little)."""
    import torch

    with path.open("rb") as f:
        head = f.read(len(_LFS_POINTER))
    if head == _LFS_POINTER:
        return "lfs"
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt"):
                pass
        else:
            torch.load(path, map_location="cpu", weights_only=True, mmap=head.startswith(b"PK\x03\x04"))
    except Exception as e:
        if isinstance(e, EOFError):
            return "it ends early"
        if path.suffix == ".safetensors" or "PytorchStreamReader" in str(e):
            return str(e).split(". ")[0]
        return "not a checkpoint torch.load(weights_only=True) reads"
    return None


def cached_hub_file(repo_id: str, name: str, revision: str | None = None) -> Path | None:
    """The local Hugging Face cache's copy of file `name` of hub repo ``repo_id`` at `revision` (its main branch where
    None), or None; no network."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, name, revision=revision)
    except Exception:  # not a valid repo id: nothing cached
        return None
    return Path(found) if isinstance(found, str) else None


def _weights_folder(ref: str | Path, revision: str | None) -> Path | None:
    """The folder holding the weights of `ref`: a local folder, or a hub repo's snapshot in the local Hugging Face
    cache at `revision` (its main branch where None), found without a request; None where there is none."""
    folder = Path(str(ref)).expanduser()
    if folder.is_dir():
        return folder
    if is_local_ref(str(ref)):
        return None
    for name in ("config.json", "adapter_config.json"):
        if (found := cached_hub_file(str(ref), name, revision)) is not None:
            return found.parent  # <cache>/models--org--name/snapshots/<commit>/config.json
    return None


@contextlib.contextmanager
def readable_weights(ref: str | Path, revision: str | None = None, *, names: re.Pattern = _WEIGHTS_READ,
                     fix: str = "fetch or save it again"):
    """Around the loading of the weights of `ref` (a model's or a PEFT adapter's: a local folder, or a hub repo read
    from the local Hugging Face cache at `revision`): a weights file that cannot be read (a Git LFS pointer, as a
    clone without git-lfs leaves it; a file cut short by an interrupted download or copy; any file that is no
    checkpoint) is a ValueError naming the file, where safetensors, torch.load and pickle ended in their tracebacks
    (torch's advising weights_only=False, or a bare KeyError of its unpickler), and so is a shards' index
    (model.safetensors.index.json, ...) that is no JSON object, where json's message named no file. Other errors,
    and those of a ref with no weights here, are left as they are. `names`: the names of the files checked (a model's
    or an adapter's weights); `fix`: the advice for a local file that cannot be read."""
    try:
        yield
    except Exception as e:
        # (any error: an index of invalid JSON fails in json's message, one of another JSON value, a list, in a
        # TypeError or AttributeError of transformers' reading of it)
        if (folder := _weights_folder(ref, revision)) is not None:
            for index in sorted(folder.glob("*.index.json")):
                if _WEIGHT_FILE.fullmatch(index.name):
                    json_object(index, "a weights index (a JSON object)", "fetch or save the model again")
        if not _raised_reading(e):
            raise
        folder = _weights_folder(ref, revision)
        files = sorted(p for p in folder.iterdir() if p.is_file() and names.fullmatch(p.name)) \
            if folder is not None else []
        bad = [(path, why) for path in files if (why := _unreadable(path)) is not None]
        if not bad:
            raise
        hub = folder != Path(str(ref)).expanduser()  # (a hub repo's copy in the cache)
        download = f"`hf download {ref}{f' --revision {revision}' if revision else ''} --force-download`"
        raise ValueError(_unreadable_message(ref, folder, hub, download, bad, fix)) from None


def _named(names: list[str], most: int = 4, shown: int | None = None) -> str:
    """`names` joined, all of them where they are at most `most`, else the first `shown` (most - 1 by default, so that
    no list ends in 'and 1 more') and a count of the others. zoo.train names the files of a changed data source so
    too (shown = most)."""
    shown = most - 1 if shown is None else shown
    return ", ".join(names) if len(names) <= most else f"{', '.join(names[:shown])} and {len(names) - shown} more"


def _unreadable_message(ref: str | Path, folder: Path, hub: bool, download: str, bad: list[tuple[Path, str]],
                        fix: str) -> str:
    """readable_weights' one line for the weights files `bad` of `folder` (each with why it cannot be read, from
    _unreadable), naming each (or the first few and a count) with the advice for its kind: fetching the weights a Git
    LFS pointer stands for, downloading or copying again a file cut short or corrupted."""
    lfs = [path for path, why in bad if why == "lfs"]
    cut = [(path, why) for path, why in bad if why != "lfs"]
    where = f"{ref} (its copy in the Hugging Face cache, {folder})" if hub else str(folder)
    parts = []
    if lfs:
        origin, fetch = (f"the copy of {ref} in the Hugging Face cache", f"download them again ({download}); where "
                         f"the repo itself holds the pointer, its owner must upload the weights with git-lfs") if hub \
            else ("a clone made without git-lfs",
                  "fetch them (`git lfs pull` in the clone, or `hf download ID --local-dir DIR`)")
        if len(lfs) == 1 and not cut:
            return f"{lfs[0]} is a Git LFS pointer, not the weights it stands for ({origin}): {fetch}"
        pointers = "is a Git LFS pointer, not the weights it stands" if len(lfs) == 1 else \
            "are Git LFS pointers, not the weights they stand"
        parts.append(f"its weights ({_named([path.name for path in lfs])}) {pointers} for ({origin}): {fetch}")
    if cut:
        reasons = list(dict.fromkeys(why for _, why in cut))
        why = reasons[0] if len(reasons) == 1 else f"{cut[0][0].name}: {cut[0][1]}; ..."
        again = f"download {'it' if len(cut) == 1 else 'them'} again ({download})" if hub else fix
        cut_short = "a file cut short or corrupted" if len(cut) == 1 else "files cut short or corrupted"
        parts.append(f"{'and ' if lfs else ''}its weights ({_named([path.name for path, _ in cut])}) cannot be read "
                     f"({why}): {cut_short} (an interrupted download or copy?); {again}")
    return f"{where}: {'; '.join(parts)}"


def _adapter_not_model(what: str, text: str) -> str:
    return f"{what}: {text!r} holds a PEFT adapter, not a model; give its base model or the merged model"


def load_model_not_adapter(ref: str | Path, what: str = "model", **kwargs) -> PreTrainedModel:
    """`AutoModelForCausalLM.from_pretrained(ref, **kwargs)` for a model to train, with a ValueError where `ref` is a
    hub repo holding a PEFT adapter (a local adapter folder is refused by `check_model_ref`, before). transformers
    loads such a repo as its base model with the adapter in its layers (with peft installed: trained on, and saved as
    the adapter alone) or fails for want of its config.json (without); it is told by what from_pretrained did, or
    where it failed, so that a model's id costs no hub request more than from_pretrained's own."""
    from transformers import AutoModelForCausalLM

    import zoo  # noqa: F401  (registers the zoo's Auto classes)

    try:
        with readable_weights(ref, kwargs.get("revision")):
            model = AutoModelForCausalLM.from_pretrained(ref, **kwargs)
    except OSError:
        if adapter_config_file(ref) is not None:
            raise ValueError(_adapter_not_model(what, str(ref))) from None
        raise
    if getattr(model, "_hf_peft_config_loaded", False):  # transformers' flag: it loaded an adapter into the model
        raise ValueError(_adapter_not_model(what, str(ref)))
    return model


def check_tokenizer_ref(name_or_path: str | Path) -> None:
    """Raise ValueError when a tokenizer reference names a local path that is not a folder (a missing one, or a
    file): transformers would call it an invalid hub id ("Repo id must be in the form ...")."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_file() or (is_local_ref(text) and not path.exists()):
        raise ValueError(f"tokenizer: {text!r}: no such tokenizer folder; give 'byte', a tokenizer folder or a hub id")


def is_local_ref(text: str) -> bool:
    """Whether a model or tokenizer reference names a local path rather than a possible hub id ('org/name'): it is
    absolute, starts with '.' or '~', or its first component is a folder here (`runs/nope` with a `runs/` folder)."""
    parts = Path(text).parts
    return Path(text).expanduser().is_absolute() or text.startswith((".", "~")) or (
        len(parts) > 1 and Path(parts[0]).is_dir())


def adapter_config_file(ref: str | Path) -> Path | None:
    """The adapter_config.json of the PEFT adapter `ref` names, or None: a local folder's, or a hub repo's (fetched,
    or read from the hub cache offline, as transformers' from_pretrained looks for one); a local path that is not a
    folder and a hub id without one give None."""
    text = str(ref)
    path = Path(text).expanduser()
    if path.is_dir():
        return path / "adapter_config.json" if (path / "adapter_config.json").is_file() else None
    if path.exists() or is_local_ref(text):
        return None
    from transformers.utils import find_adapter_config_file

    found = find_adapter_config_file(text)
    return Path(found) if found else None


def _base_of(ref: str) -> str:
    """How an error names the base model of PEFT adapter `ref` (`check_model_ref`'s `what`)."""
    return f"the base model of the PEFT adapter {ref} (its adapter_config.json's base_model_name_or_path)"


def tokenizer_source(ref: str | Path) -> str:
    """Where the tokenizer of model `ref` is: `ref` itself, or, for a PEFT adapter (a local folder or a hub repo) that
    holds no tokenizer files, its base model (adapter_config.json's base_model_name_or_path), whose tokenizer the
    adapter was trained with, as PEFT's users load it. `ref` as given where no base is named."""
    text = str(ref)
    config = adapter_config_file(text)
    if config is None:
        return text
    folder = Path(text).expanduser()
    if folder.is_dir():
        if holds_tokenizer(folder):
            return text
    else:
        from transformers.utils import cached_file

        if any(cached_file(text, name, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False) for name in _TOKENIZER_FILES):
            return text
    try:
        base = json.loads(config.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError):
        return text
    if not (isinstance(base, str) and base):
        return text
    check_model_ref(base, _base_of(text))  # (a moved base folder was 'no such tokenizer folder')
    return base


# beside a PEFT adapter that zoo finetune saved: how its rows began ({"add_bos": false}), which the merged model records
# in its config (add_bos) and the adapter, loaded onto its base model's config, had nowhere to keep
ADAPTER_DATA_FILE = "zoo_finetune.json"


def _adapter_data(source: str) -> dict:
    """The `ADAPTER_DATA_FILE` record of the adapter folder or hub repo `source` ({} where it has none)."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        found = folder / ADAPTER_DATA_FILE
        found = found if found.is_file() else None
    else:
        from transformers.utils import cached_file

        found = cached_file(source, ADAPTER_DATA_FILE, _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
    if found is None:
        return {}
    try:
        record = json.loads(Path(found).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def load_causal_lm(ref: str | Path, **kwargs) -> PreTrainedModel:
    """`AutoModelForCausalLM.from_pretrained(ref, **kwargs)`, but a PEFT adapter (a local adapter folder or a hub repo
    holding one) loads as PEFT loads it: its base model (its adapter_config.json's base_model_name_or_path, at its
    revision, with kwargs; resized to the embedding rows the adapter saved) with the adapter in its layers
    (``PeftModel.from_pretrained``), the model class returned. transformers' own loading of an adapter left out LoRA's
    DoRA magnitudes (``use_dora``, whose saved keys it does not recognize), so a DoRA finetune ran with its magnitudes
    at their initial values, behind a load report only. An adapter of zoo finetune's records how its rows began
    (data.add_bos, `ADAPTER_DATA_FILE`): it is put in the model's config as the merged model's config holds it
    (zoo.eval.common.trained_with_bos reads it). The adapter is not merged: to save the model, merge it
    (``PeftModel.from_pretrained(base, ref).merge_and_unload()``; `save_model_folder` refuses the unmerged model, whose
    adapted weights from_pretrained would not load). A prompt-learning adapter (prompt tuning, P-tuning, prefix tuning:
    virtual tokens the PeftModel adds around the model) is refused with a ValueError, and so is an adapter that does not
    fit its base model (`_check_adapter_fits`: a base folder that came to hold another model)."""
    import zoo  # noqa: F401  (registers the zoo's Auto classes)

    if adapter_config_file(ref) is None:
        return _causal_lm_with_head(ref, **kwargs)
    from peft import PeftConfig, PeftModel

    source = str(Path(str(ref)).expanduser()) if Path(str(ref)).expanduser().is_dir() else str(ref)
    config = PeftConfig.from_pretrained(source)
    if config.is_prompt_learning:  # (get_base_model below returned the base model alone, as if no adapter were given)
        method = getattr(config.peft_type, "value", config.peft_type)
        raise ValueError(f"{ref} holds a PEFT {method} adapter, whose virtual tokens the PeftModel adds to the "
                         f"model's input (or cache) from outside its layers; zoo generate and zoo eval run the model "
                         f"itself, which would be the base model alone. Run it with PeftModel.from_pretrained(base "
                         f"model, {str(ref)!r}) and its generate, or train a LoRA adapter (zoo finetune), which lives "
                         f"in the layers")
    task = getattr(config.task_type, "value", config.task_type)
    if task not in (None, "CAUSAL_LM"):  # (a classifier's loaded onto the causal LM without a word, its head dropped)
        raise ValueError(f"{ref} holds a PEFT adapter of task_type {task} (adapter_config.json), not a causal LM's: "
                         f"zoo generate and zoo eval run causal LMs; load it onto the model class of its task "
                         f"(AutoModelForSequenceClassification for SEQ_CLS) with PeftModel.from_pretrained")
    base = config.base_model_name_or_path
    if not base:
        raise ValueError(f"{ref} holds a PEFT adapter whose adapter_config.json names no base model "
                         f"(base_model_name_or_path); load its base model and apply it with PeftModel.from_pretrained")
    check_model_ref(base, _base_of(str(ref)))  # a moved base folder was an invalid hub id to transformers
    if getattr(config, "revision", None) and "revision" not in kwargs:
        # the base's revision the adapter was trained on (get_peft_model(..., revision=)), as PEFT's AutoPeftModel loads
        # it: the hub's newest base was loaded instead
        kwargs = {**kwargs, "revision": config.revision}
    model = _causal_lm_with_head(base, **kwargs)
    with readable_weights(source):  # (the base's weights: read in _causal_lm_with_head)
        rows = _adapter_embedding_rows(source, model)
    if rows is not None and rows != model.get_input_embeddings().num_embeddings:
        # an adapter trained with tokens added to its tokenizer holds the resized embeddings (PEFT's
        # save_embedding_layers): PEFT's users resize the base to them first, and loading failed in load_state_dict
        model.resize_token_embeddings(rows)
    with peft_wrapping(), readable_weights(source):
        try:
            peft_model = PeftModel.from_pretrained(model, source)
        except RuntimeError as e:  # (the traceback of load_state_dict's 'size mismatch for ...' lines)
            if "size mismatch" not in str(e):
                raise
            found = re.search(r"size mismatch for ([^:]+): (.*?)\.?$", str(e), re.MULTILINE)
            detail = f" ({found.group(1)}: {found.group(2)})" if found else ""
            raise ValueError(f"{ref} is a PEFT adapter of another model than its base model {base}: its weights do "
                             f"not fit the base's shapes{detail}; give the base model it was trained on") from None
        _check_adapter_fits(peft_model, source, ref, base)
        model = peft_model.get_base_model()  # the model class, adapters active in it
    if tokenizer_source(source) == source:
        # the tokenizer the adapter holds (zoo finetune saves the one it trained with) fills the base config's unset
        # special ids, as it fills the merged model's (save_model_folder): zoo generate of the adapter ran past the eos
        # the finetune taught its rows to end with, while the merged model's stopped there
        fill_special_ids(model, load_folder_tokenizer(source))
    if isinstance(add_bos := _adapter_data(source).get("add_bos"), bool):
        # (the base's config said nothing, or what the base trained on: a finetune without bos was prompted with one)
        model.config.add_bos = add_bos
    return model


def _check_adapter_fits(peft_model: Any, source: str, ref: str | Path, base: str) -> None:
    """Raise ValueError where the PEFT adapter `source`, loaded into `peft_model` (its base model `base`), does not fit
    that base: weights of the adapter that match none of its modules (dropped), or adapted modules of the base that
    the adapter holds no weights for (left at their initial values, a no-op). PEFT loads such an adapter with a warning
    about the second kind alone, and the model ran with part of its adapter, or none (a base folder that holds another
    model than the one the adapter was trained on)."""
    from peft.utils import get_peft_model_state_dict, load_peft_weights
    from safetensors import safe_open

    # the names of its weights only: PEFT's load_peft_weights read them all a second time (onto the GPU where there is
    # one, an adapter of a resized vocabulary's whole embeddings with them) to take their names
    if (found := _adapter_weights_file(source)) is not None:
        with safe_open(found, "pt") as weights:
            saved = set(weights.keys())
    else:  # (an adapter_model.bin: read whole, on the CPU)
        saved = set(load_peft_weights(source, device="cpu"))
    expected = set(get_peft_model_state_dict(peft_model, save_embedding_layers=False))
    # and the embeddings that an adapter of a resized vocabulary saves whole (save_embedding_layers), which it may hold
    may_hold = set(get_peft_model_state_dict(peft_model, save_embedding_layers=True))
    dropped, missing = sorted(saved - expected - may_hold), sorted(expected - saved)
    if dropped or missing:
        parts = ([f"its weights {_named(dropped, 3)} match no module of the base"] if dropped else []) + \
                ([f"it holds no weights for the base's adapted {_named(missing, 3)}"] if missing else [])
        raise ValueError(f"{ref} is a PEFT adapter of another model than its base model {base}: "
                         f"{'; '.join(parts)}; give the base model it was trained on")


def _causal_lm_with_head(ref: str | Path, **kwargs) -> PreTrainedModel:
    """`AutoModelForCausalLM.from_pretrained(ref, **kwargs)`, refused (ValueError) where the checkpoint holds no
    weights for its LM head, untied from the input embedding: a sequence classifier's folder (its `score` in place of
    the head) or a base model's (ZooModel) loaded with a newly initialized lm_head, and zoo generate printed random
    tokens, zoo eval scored them, behind transformers' load report alone; and so is a checkpoint that lacks any other
    of the model's weights."""
    from transformers import AutoModelForCausalLM

    with readable_weights(ref, kwargs.get("revision")):
        model, info = AutoModelForCausalLM.from_pretrained(ref, output_loading_info=True, **kwargs)
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and embedding is not None and head.weight is not embedding.weight:
        names = [n for n, p in model.named_parameters(remove_duplicate=False) if p is head.weight]
        if missing := [n for n in names if n in set(info.get("missing_keys") or ())]:
            architectures = getattr(model.config, "architectures", None) or []
            what = f" (a {', '.join(architectures)} checkpoint, config.json's architectures)" if architectures else ""
            raise ValueError(f"{ref} holds no weights for the causal LM's output layer {missing[0]}{what}: loaded as "
                             f"a causal LM its {missing[0]} would be newly initialized, and its tokens random; give a "
                             f"causal LM's checkpoint")
    # any other weight the checkpoint lacks (a shard or a key lost, another version's layout): newly initialized too,
    # and zoo generate and zoo eval ran the model with it behind transformers' load report alone
    if missing := sorted(str(k) for k in info.get("missing_keys") or ()):
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ValueError(f"{ref} holds no weights for {shown}: loaded, they would be newly initialized and the model's "
                         f"output random; give a complete checkpoint of the model its config.json describes")
    return model


def _adapter_weights_file(source: str) -> str | None:
    """The adapter_model.safetensors of the PEFT adapter `source` (a folder, or a hub repo's cached file), or None where
    it has none (an adapter_model.bin)."""
    folder = Path(source)
    if folder.is_dir():
        found = folder / "adapter_model.safetensors"
        return str(found) if found.is_file() else None
    from transformers.utils import cached_file

    return cached_file(source, "adapter_model.safetensors", _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=False)


def _adapter_embedding_rows(source: str, model: PreTrainedModel) -> int | None:
    """The rows of the input embedding that the PEFT adapter `source` (a folder or hub repo) saved, whole or as a
    modules_to_save copy; None where its weights (adapter_model.safetensors) hold none."""
    from safetensors import safe_open

    found = _adapter_weights_file(source)
    embedding = model.get_input_embeddings()
    name = next((n for n, m in model.named_modules() if m is embedding), None)
    if found is None or name is None:
        return None
    prefix = f"base_model.model.{name}."
    with safe_open(str(found), "pt") as weights:
        for key in weights.keys():
            shape = weights.get_slice(key).get_shape()
            if key.startswith(prefix) and key.endswith(".weight") and "lora_" not in key and len(shape) == 2 \
                    and shape[1] == embedding.embedding_dim:
                return int(shape[0])
    return None


def load_model_folder(folder: str | Path, **kwargs) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """The model (`AutoModelForCausalLM.from_pretrained`, kwargs passed on) and tokenizer (None if the folder
    has none) of a model folder."""
    from transformers import AutoModelForCausalLM

    import zoo  # noqa: F401  (registers the zoo's Auto classes)

    check_model_ref(folder)
    if Path(folder).expanduser().is_dir():  # transformers took '~/model' for an invalid hub id
        folder = Path(folder).expanduser()
    with readable_weights(folder):
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    return model, load_folder_tokenizer(folder)


__all__ = ["ADAPTER_DATA_FILE", "TOKENIZER_FAMILY", "adapter_config_file", "check_model_ref", "check_save_folder",
           "fill_special_ids", "holds_tokenizer", "holds_weights", "json_object", "load_causal_lm",
           "load_folder_tokenizer", "load_model_folder", "load_model_not_adapter", "peft_layer", "readable_weights",
           "require_tokenizer", "save_model_folder", "shard_size", "tokenizer_source", "write_folder"]
