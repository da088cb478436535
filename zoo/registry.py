"""Mixer registry: short name -> mixer class; an unregistered name may be a dotted import path.

A mixer is an nn.Module that the model builds as ``cls(d_model, layer_idx, **options)`` (options: its spec less
type and ffn) and calls as ``forward(x, *, cache=None, seq_idx=None, position_ids=None, attention_mask=None)``;
init_state, state_size, lora_targets and output_projections are optional (see the README's Mixers section)."""

from __future__ import annotations

import difflib
import importlib
import inspect
import os

from torch import nn

_MIXERS: dict[str, type[nn.Module]] = {}
# Dotted paths resolved by code the user ran (not by a config from disk), so loading them is trusted.
_TRUSTED_PATHS: set[str] = set()
# the lora_targets of every mixer class registered or resolved by path, kept current: `import zoo` hands this one list
# to PEFT as model type "zoo"'s default targets, so a mixer registered after the import is adapted too
LORA_TARGETS: list[str] = []


def _add_lora_targets(cls: type[nn.Module]) -> None:
    targets = getattr(cls, "lora_targets", ())
    if isinstance(targets, str) or not all(isinstance(t, str) for t in targets):
        # a string's letters would join PEFT's default targets one by one ('p', 'r', 'o', 'j'), adapting nothing
        raise ValueError(f"{cls.__name__}.lora_targets: expected a tuple of the names of its nn.Linear children, "
                         f"e.g. ({targets!r},), got {targets!r}")
    LORA_TARGETS.extend(t for t in dict.fromkeys(getattr(cls, "lora_targets", ())) if t not in LORA_TARGETS)


# the keywords the model passes to every mixer's forward (Block.forward)
FORWARD_KEYWORDS = ("cache", "seq_idx", "position_ids", "attention_mask")


def contract_problem(cls, options: dict) -> str | None:
    """What keeps `cls` from being built and called as the model does (the module docstring), or None. A forward
    written without attention_mask (or __init__ without layer_idx) failed only at the model's first forward (or its
    construction) with a bare TypeError."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        return f"{cls!r} is not an nn.Module class"
    calls = ((cls.__init__, (None, 1, 0), options, f"{cls.__name__}(d_model, layer_idx, **options)"),
             (cls.forward, (None, None), dict.fromkeys(FORWARD_KEYWORDS),
              f"forward(x, *, {', '.join(k + '=None' for k in FORWARD_KEYWORDS)})"))
    for fn, args, kwargs, call in calls:
        try:
            signature = inspect.signature(fn)
        except (TypeError, ValueError):
            continue  # no signature to read (a builtin): left to the call
        try:
            signature.bind(*args, **kwargs)
        except TypeError as e:
            return f"the model calls {call}, which {cls.__name__}.{fn.__name__}{signature} does not take ({e})"
    return None


def register_mixer(name: str):
    """Class decorator: `@register_mixer("mamba")` makes the class available to configs as `type: mamba`."""
    if isinstance(name, type):  # `@register_mixer` without the name: the class would become `wrap`, unregistered
        raise TypeError(f"register_mixer takes the name that configs give the mixer: write "
                        f"@register_mixer({name.__name__.lower()!r}) above class {name.__name__}, not @register_mixer")
    if not isinstance(name, str) or not name.strip():
        raise TypeError(f"register_mixer: the mixer's name must be a non-empty string, got {name!r}")
    if "." in name:  # a saved model's config naming it read as an import path where the name was not registered
        raise ValueError(f"register_mixer: {name!r} has a '.', which configs read as a dotted import path (a model "
                         f"saved with it would load as one, refused or failing to import, in a process that has not "
                         f"registered it); give a name without dots, e.g. {name.replace('.', '_')!r}")

    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _MIXERS and _MIXERS[name] is not cls:
            raise ValueError(f"mixer {name!r} is already registered as {_MIXERS[name].__qualname__}")
        _add_lora_targets(cls)  # (first: it refuses malformed lora_targets)
        _MIXERS[name] = cls
        cls.mixer_type = name
        return cls

    return wrap


def list_mixers() -> list[str]:
    """Names of the registered mixers."""
    _load_builtin()
    return sorted(_MIXERS)


def is_dotted_path(name: str) -> bool:
    return "." in name and name not in _MIXERS


def trust_mixer_path(path: str) -> None:
    """Allow a dotted-path mixer in configs loaded from disk (the code equivalent of trust_remote_code)."""
    _TRUSTED_PATHS.add(path)


# the command-line tools (zoo generate, eval, finetune, train from a saved model) take no trust_remote_code: this
# environment variable names the dotted-path mixers (comma-separated) that configs from disk may import
TRUST_ENV = "ZOO_TRUST_MIXER_PATHS"


def _env_trusted(name: str) -> bool:
    return name in {p.strip() for p in os.environ.get(TRUST_ENV, "").split(",")}


def get_mixer(name: str, trust_remote_code: bool = True) -> type[nn.Module]:
    """The mixer class for `name`: a registered short name, or `package.module.ClassName`.

    A dotted path imports code, so it resolves only when trusted (see `trust_mixer_path`, or the environment
    variable ZOO_TRUST_MIXER_PATHS: comma-separated paths) or when `trust_remote_code` is True.
    """
    _load_builtin()
    if name in _MIXERS:
        return _MIXERS[name]
    if "." not in name:
        # as every other unknown name in a config (a field, an option): the closest one first ('Mamba2', 'atention')
        lowered = {n.lower(): n for n in _MIXERS}
        close = difflib.get_close_matches(name.lower(), list(lowered), n=1)
        hint = f"did you mean {lowered[close[0]]!r}? " if close else ""
        raise ValueError(f"unknown mixer {name!r}; {hint}registered mixers: {', '.join(sorted(_MIXERS))} "
                         f"(or give a dotted import path such as 'mypkg.mixers.MyMixer'). A mixer registered with "
                         f"zoo.register_mixer({name!r}) is known only in a process that ran the registration: "
                         f"import the module that registers it before building or loading a model that names it")
    if not (trust_remote_code or name in _TRUSTED_PATHS or _env_trusted(name)):
        raise ValueError(f"mixer {name!r} is a dotted import path from a config that came from disk; loading it "
                         f"runs code. Pass trust_remote_code=True to from_pretrained; before from_config or the "
                         f"constructor (which take no trust_remote_code) call "
                         f"zoo.registry.trust_mixer_path({name!r}); for zoo's command-line tools set the "
                         f"environment variable {TRUST_ENV}={name}")
    module_name, _, cls_name = name.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"mixer {name!r} could not be imported: {e}") from e
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"mixer {name!r} is not an nn.Module class")
    _add_lora_targets(cls)
    return cls


def _load_builtin() -> None:
    import zoo.mixers  # noqa: F401  (registers the built-in mixers)
