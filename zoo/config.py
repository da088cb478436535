"""ZooConfig: one Hugging Face config for every mixer mix (pattern string or per-layer list)."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import math
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any

from transformers import PreTrainedConfig

FFN_TYPES = ("swiglu", "none")
FFN_FIELDS = {"type": str, "hidden": int | None}
MOE_FIELDS = {"every": int, "offset": int | None, "n_experts": int, "top_k": int, "hidden": int | None,
              "aux_loss_coef": float, "normalize_topk": bool}
FFN_KEYS = tuple(FFN_FIELDS)
MOE_KEYS = tuple(MOE_FIELDS)
# top-level fields checked by type (token ids are left to transformers: eos_token_id may be a list)
FIELD_TYPES = {"vocab_size": int, "d_model": int, "tie_embeddings": bool, "norm_eps": float,
               "initializer_range": float, "rescale_prenorm_residual": bool, "residual_in_fp32": bool,
               "use_cache": bool, "decode_state_dtype": str, "output_router_logits": bool}
# transformers' names of zoo fields: either name may be given, both only with equal values
ALIASES = {"hidden_size": "d_model", "tie_word_embeddings": "tie_embeddings"}
DEFAULTS = {"d_model": 768, "tie_embeddings": True}


def coerce_scalar(value: Any, tp: type, where: str, int_as_float: bool = False) -> Any:
    """`value` checked as a bool, int, float or str (`tp`), for configs read from YAML: a string that parses as a
    number becomes a float where a float is expected (YAML reads 1e-5, without a dot, as the string '1e-5'), and
    an int there becomes a float with `int_as_float`; a whole number, or a string that reads as one ('1e5',
    '2048'), becomes an int where an int is expected; any other mismatch raises ValueError naming `where`."""
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        number = value
        if isinstance(value, str):  # '100', or '1e5' (YAML reads 1e5, without a dot, as a string)
            try:
                number = float(value.strip().replace("_", ""))
            except ValueError:
                number = None
        if isinstance(number, float) and number.is_integer():
            return int(number)
        if isinstance(number, bool) or not isinstance(number, int):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return number
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise ValueError(f"{where}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(value) if int_as_float else value
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected a string, got {value!r}")
    return value


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """`value` checked against type hint `tp` as zoo.train checks run configs: a string that parses as a number
    becomes a float where a float is expected (YAML reads 1e-5, without a dot, as the string '1e-5'); any other
    mismatch raises ValueError naming `where`. Hints other than bool/int/float/str, their unions and tuples pass."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _coerce(value, options[0], where)
        for option in options:
            try:
                return _coerce(value, option, where)
            except ValueError:
                pass
        raise ValueError(f"{where}: expected one of {' | '.join(getattr(a, '__name__', str(a)) for a in args)}, "
                         f"got {value!r}")
    if tp in (bool, int, float, str):
        return coerce_scalar(value, tp, where)  # an int stays an int where a float is expected: config.json keeps it
    if origin is tuple and args and Ellipsis not in args:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return type(value)(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    return value


def _coerce_fields(data: dict, hints: dict, where: str) -> dict:
    """A copy of `data` with each key that has a hint in `hints` coerced (other keys are checked elsewhere)."""
    return {k: _coerce(v, hints[k], f"{where}{k}") if k in hints else v for k, v in data.items()}


def _mixer_hints(mixer_type: Any) -> dict:
    """Type hints of a registered mixer's keyword options ({} for a dotted path: it is imported only when the
    model is built, and only when trusted)."""
    from zoo.registry import get_mixer, is_dotted_path

    if not isinstance(mixer_type, str) or is_dotted_path(mixer_type):
        return {}
    try:
        cls = get_mixer(mixer_type)
    except ValueError:
        return {}  # an unknown type is named by validate_zoo
    return _class_hints(cls)


def _agreeing_alias(alias: str, given: Any, value: Any) -> Any:
    """`given` for transformers' name `alias` of a field, coerced to the field's type; ValueError when the field's own
    name gave another `value` (None: not given)."""
    name = ALIASES[alias]
    alias_value = _coerce(given, FIELD_TYPES[name], alias)
    if value is not None and (type(value) is not type(alias_value) or value != alias_value):
        raise ValueError(f"{alias}: {alias_value!r} disagrees with {name}: {value!r} ({alias} is transformers' name "
                         f"for {name}); give one of them")
    return alias_value


def _class_hints(cls) -> dict:
    """Type hints of the keyword options of mixer class `cls`: those that resolve (one that does not, a name imported
    only under TYPE_CHECKING, dropped all of them, and YAML's 1e-3 reached every option as a string)."""
    init = cls.__init__
    try:
        hints = typing.get_type_hints(init)
    except (NameError, TypeError, AttributeError):
        hints = {}
        try:
            annotations = dict(getattr(init, "__annotations__", None) or {})
        except (NameError, TypeError, AttributeError):
            annotations = {}

        def one() -> None: ...

        for key, hint in annotations.items():  # each on its own
            one.__annotations__ = {key: hint}
            try:
                hints.update(typing.get_type_hints(one, globalns=getattr(init, "__globals__", None)))
            except (NameError, TypeError, AttributeError):
                continue
    return {k: v for k, v in hints.items() if k not in ("self", "d_model", "layer_idx", "return")}


def coerce_mixer_options(cls, options: dict, at: str) -> dict:
    """`options` (a spec less type and ffn) checked against the type hints of mixer class `cls` as coerce_fields
    checks a registered mixer's: for a dotted-path mixer, imported only when the model is built (YAML's `1e-3`,
    a string, reached it as one). Raises ValueError naming `at`.key."""
    return _coerce_fields(options, _class_hints(cls), f"{at}.")


def check_mixer_options(cls, spec: dict, d_model: int, at: str, where: str) -> None:
    """Raise ValueError naming `at`.key for an option of `spec` that the mixer class `cls` does not take (with the
    closest one), naming `at`.type for a class that breaks the mixer contract (zoo.registry.contract_problem), and
    the mixer's own `check_spec` complaint under `where`."""
    mixer_type = spec.get("type")
    kwargs = {k: v for k, v in spec.items() if k not in ("type", "ffn")}
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        # the model passes self's, d_model's and layer_idx's slots by position; every other parameter that takes a
        # keyword is an option (one written without `*` too: the valid ones read empty, with no did-you-mean)
        positional = [n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        allowed = [n for n, p in params.items() if n not in positional[:3] and n not in ("d_model", "layer_idx")
                   and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        for key in kwargs:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise ValueError(f"{at}.{key}: unknown option for mixer {mixer_type!r}; {hint}"
                                 f"valid options: {', '.join(allowed) or 'none (it takes no options)'}")
    from zoo.registry import contract_problem

    if problem := contract_problem(cls, kwargs):
        raise ValueError(f"{at}.type: mixer {mixer_type!r} does not follow the mixer contract: {problem}")
    check = getattr(cls, "check_spec", None)
    if check is not None:
        try:
            check(d_model, **kwargs)
        except ValueError as e:
            raise ValueError(f"{where} ({mixer_type}): {e}") from None


def _unknown_key(keys, known, where: str) -> str | None:
    """A message naming the first of `keys` not in `known` (with the closest known one), else None."""
    unknown = [k for k in keys if k not in known]
    if not unknown:
        return None
    key = unknown[0]
    close = difflib.get_close_matches(str(key), [str(k) for k in known], n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"{where}{key}: unknown field; {hint}fields: {', '.join(known)}"


def _parse_layers(layers: str | list, mixers: dict) -> list[dict]:
    """Resolve `layers` into one spec dict per layer (each with 'type' and optional 'ffn')."""
    if isinstance(layers, str):
        letters = [c for c in layers if not c.isspace()]
        if not letters:
            raise ValueError("layers: the pattern string is empty; give one letter per layer, e.g. 'MMAM'")
        specs = []
        for i, letter in enumerate(letters):
            if letter not in mixers:
                known = ", ".join(sorted(mixers)) or "none"
                raise ValueError(f"layers: letter {letter!r} (layer {i}) has no spec in `mixers` (defined: {known}); "
                                 f"add mixers.{letter}: {{type: ...}}")
            specs.append(copy.deepcopy(dict(mixers[letter])) | {"_letter": letter})
        return specs
    if isinstance(layers, (list, tuple)):
        if not layers:
            raise ValueError("layers: the list is empty; give one spec dict per layer")
        specs = []
        for i, spec in enumerate(layers):
            if isinstance(spec, str) and spec in mixers:
                spec = mixers[spec]
            if not isinstance(spec, dict):
                raise ValueError(f"layers[{i}]: expected a dict like {{type: mamba, ...}} or a letter of `mixers`, "
                                 f"got {spec!r}")
            specs.append(copy.deepcopy(dict(spec)))
        return specs
    raise ValueError(f"layers: expected a pattern string or a list of per-layer dicts, got {type(layers).__name__}")


DECODE_STATE_DTYPES = ("float32", "model")


class ZooConfig(PreTrainedConfig):
    r"""Config of a zoo model.

    vocab_size: vocabulary size. d_model: residual width. layers: pattern string (one letter per layer, spaces
    ignored) whose letters are keys of `mixers`, or a list of per-layer spec dicts. mixers: letter -> mixer spec
    ({type: mamba|mamba2|attention|gla|dotted.Path, **kwargs}); a spec may carry `ffn: swiglu|moe|none` to
    override the layer's feed-forward. ffn: {type: swiglu, hidden: int} or "none". moe: optional
    {every, offset, n_experts, top_k, hidden, aux_loss_coef, normalize_topk}: layers with index % every == offset
    use a MoE; null is none, and a key left out (`moe: {}` leaves them all) takes its default: every 2, offset 1
    (0 when every is 1), n_experts 16, top_k 2, hidden the ffn's, aux_loss_coef 1e-3, normalize_topk true
    (Mixtral's renormalized top-k weights; Jamba's are the router probabilities as they are: false). The aux loss
    is transformers' Jamba/Mixtral load-balancing loss over all MoE layers at once (top_k when balanced), so
    aux_loss_coef is Jamba's router_aux_loss_coef whatever the number of MoE layers.
    decode_state_dtype: dtype of the recurrent states a decoding cache keeps for the recurrent mixers
    (Mamba, Mamba-2, GLA): "float32" (default, as transformers 5.25's Mamba and Mamba-2 caches keep them) or
    "model" (the model's parameter dtype, as mamba_ssm's cache keeps them: half the state's memory and bytes per
    step, rounded every step). Mamba's fused
    step kernel reads such a state as it lies; its other step paths (the unfused kernels, the references) update
    an fp32 copy and write it back.
    output_router_logits: whether the forward returns the MoE layers' router logits when its call does not say
    (False), as Mixtral's and Jamba's configs keep it.

    transformers' names are the same fields: hidden_size is d_model (768), tie_word_embeddings is tie_embeddings
    (True); num_hidden_layers follows `layers` (given, it must agree). Numeric strings (YAML reads 1e-5 as one)
    become floats where a float is expected; any other mistyped value raises ValueError naming the field.
    """

    model_type = "zoo"
    attribute_map = dict(ALIASES)
    # outputs the Trainer leaves out of its predictions: they are the logits alone, as transformers' MoE models give
    # them (those return an aux loss only with output_router_logits)
    keys_to_ignore_at_inference = ["cache", "past_key_values", "aux_loss", "router_logits"]

    vocab_size: int = 50304
    d_model: int | None = None  # None: hidden_size, else 768
    layers: Any = "MM"
    mixers: Any = field(default_factory=lambda: {"M": {"type": "mamba"}})
    ffn: Any = field(default_factory=lambda: {"type": "swiglu"})
    moe: Any = None
    tie_embeddings: bool | None = None  # None: tie_word_embeddings, else True
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    rescale_prenorm_residual: bool = True
    residual_in_fp32: bool = True
    use_cache: bool = True
    decode_state_dtype: str = "float32"
    # the forward's default, as Mixtral's and Jamba's configs keep it: a field, so from_pretrained(...,
    # output_router_logits=True) sets it (an unknown keyword went to the model's __init__: TypeError)
    output_router_logits: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self, **kwargs):
        given = {alias: kwargs.pop(alias) for alias in ALIASES if alias in kwargs}
        num_hidden_layers = kwargs.pop("num_hidden_layers", None)
        # derived from mixers, as to_dict gives it: a dict of this config fed back with other layers may carry it
        kwargs.pop("num_attention_heads", None)
        super().__post_init__(**kwargs)
        for alias, name in ALIASES.items():
            value = getattr(self, name)
            if given.get(alias) is not None:
                value = _agreeing_alias(alias, given[alias], value)
            setattr(self, name, DEFAULTS[name] if value is None else value)
        self.validate_zoo()
        self.set_num_hidden_layers(num_hidden_layers)

    def attention_heads(self) -> int | None:
        """The query heads of the attention layers where they all have the same number, else None (None too for a
        model without attention layers: recurrent mixers have no attention heads). transformers' configs call it
        num_attention_heads (Jamba's counts its attention layers only), and `to_dict` gives it under that name."""
        from zoo.mixers.attention import default_n_heads

        # a spec without n_heads has the attention mixer's default (it read None, as for a model without attention)
        counts = {default_n_heads(self.d_model) if spec.get("n_heads") is None else spec["n_heads"]
                  for spec in self.layer_specs() if spec["type"] == "attention"}
        return counts.pop() if len(counts) == 1 else None

    @property
    def num_hidden_layers(self) -> int:
        """transformers' number of blocks: the count of `layers`, read from it each time, so that it follows a
        `layers` set after the config was made (a count kept at construction went stale)."""
        if isinstance(self.layers, str):
            return sum(not c.isspace() for c in self.layers)
        return len(self.layers) if isinstance(self.layers, (list, tuple)) else len(self.layer_specs())

    @num_hidden_layers.setter
    def num_hidden_layers(self, value: Any) -> None:
        # config.num_hidden_layers = 2 (transformers' way to shrink a model before from_config) was kept on the config
        # and ignored: the model was built with every layer of `layers`, and the count reset to it
        self.set_num_hidden_layers(value)

    def set_num_hidden_layers(self, given: Any = None) -> None:
        """Check a `given` count (transformers' keyword or attribute) against `layers`, which sets the number of
        layers: num_hidden_layers follows `layers` and cannot be set to another count."""
        n = self.num_hidden_layers
        if given is not None and (isinstance(given, bool) or not isinstance(given, int) or given != n):
            raise ValueError(f"num_hidden_layers: {given!r} disagrees with layers {self.layers!r} ({n} layers); "
                             f"the number of layers follows `layers`: drop num_hidden_layers or make them agree "
                             f"(to build fewer layers, set `layers` to a shorter pattern or list)")

    # ---- resolution -------------------------------------------------------------------------------------
    def layer_specs(self) -> list[dict]:
        """One dict per layer: {'type', mixer kwargs..., 'ffn': 'swiglu'|'moe'|'none'}."""
        specs = _parse_layers(self.layers, self.mixers or {})
        ffn_type = self.ffn_spec()["type"]
        moe = self.moe_spec() if self.moe is not None else None
        for i, spec in enumerate(specs):
            spec.pop("_letter", None)
            spec.setdefault("ffn", "moe" if moe and i % moe["every"] == moe["offset"] else ffn_type)
        return specs

    def ffn_spec(self) -> dict:
        ffn = self.ffn
        if ffn is None or ffn == "none":
            return {"type": "none"}
        if isinstance(ffn, str):
            ffn = {"type": ffn}
        spec = dict(ffn)
        spec.setdefault("type", "swiglu")
        if spec["type"] == "swiglu" and spec.get("hidden") is None:
            spec["hidden"] = 64 * math.ceil(8 * self.d_model / 3 / 64)  # Llama's 8/3·d rounded up to 64
        return spec

    def moe_spec(self) -> dict:
        spec = {"every": 2, "n_experts": 16, "top_k": 2, "aux_loss_coef": 1e-3, "normalize_topk": True}
        spec.update(self.moe or {})
        if spec.get("hidden") is None:
            spec["hidden"] = self.ffn_spec().get("hidden") or 64 * math.ceil(8 * self.d_model / 3 / 64)
        if spec.get("offset") is None:
            spec["offset"] = 1 if spec["every"] > 1 else 0
        return spec

    # ---- validation -------------------------------------------------------------------------------------
    def coerce_fields(self) -> None:
        """Check the type of each top-level, ffn, moe and mixer option that has one, turning numeric strings
        (YAML's 1e-5) into floats where a float is expected, in place so that config.json holds the numbers.
        Raises ValueError naming the field."""
        for name, tp in FIELD_TYPES.items():
            setattr(self, name, _coerce(getattr(self, name), tp, name))
        if isinstance(self.ffn, dict):
            self.ffn = _coerce_fields(self.ffn, FFN_FIELDS, "ffn.")
        if isinstance(self.moe, dict):
            self.moe = _coerce_fields(self.moe, MOE_FIELDS, "moe.")
        if isinstance(self.mixers, dict):
            self.mixers = {letter: _coerce_fields(spec, _mixer_hints(spec.get("type")), f"mixers.{letter}.")
                           if isinstance(spec, dict) else spec for letter, spec in self.mixers.items()}
        if isinstance(self.layers, (list, tuple)):
            self.layers = [_coerce_fields(spec, _mixer_hints(spec.get("type")), f"layers[{i}].")
                           if isinstance(spec, dict) else spec for i, spec in enumerate(self.layers)]

    def validate_zoo(self) -> None:
        """Coerce numeric strings (coerce_fields), then raise ValueError naming the field and the fix for every
        inconsistent setting."""
        from zoo.registry import get_mixer, is_dotted_path

        self.coerce_fields()
        for name in ("vocab_size", "d_model"):
            value = getattr(self, name)
            if value <= 0:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if self.decode_state_dtype not in DECODE_STATE_DTYPES:
            raise ValueError(f"decode_state_dtype: must be one of {DECODE_STATE_DTYPES}, "
                             f"got {self.decode_state_dtype!r}")
        # (an infinite initializer_range made every logit NaN; an infinite norm_eps zeroed every normalized input)
        from zoo.layers import check_norm_eps  # (the mixers' epsilons take the same check)

        check_norm_eps(self.norm_eps)
        if not 0 < self.initializer_range < math.inf:
            raise ValueError(f"initializer_range: must be a finite number > 0, got {self.initializer_range!r}")
        if self.mixers is not None and not isinstance(self.mixers, dict):
            raise ValueError(f"mixers: expected a mapping letter -> spec, got {type(self.mixers).__name__}")
        for letter, spec in (self.mixers or {}).items():
            if not isinstance(letter, str) or len(letter) != 1 or letter.isspace():
                raise ValueError(f"mixers: keys must be single non-space letters, got {letter!r}")
            if not isinstance(spec, dict) or "type" not in spec:
                raise ValueError(f"mixers.{letter}: expected a dict with a 'type' (one of the registered mixers "
                                 f"or a dotted import path), got {spec!r}")
        if isinstance(self.ffn, dict) and (problem := _unknown_key(self.ffn, FFN_KEYS, "ffn.")):
            raise ValueError(problem)
        if isinstance(self.moe, dict) and (problem := _unknown_key(self.moe, MOE_KEYS, "moe.")):
            raise ValueError(problem)
        if self.ffn is not None and not isinstance(self.ffn, (str, dict)):
            raise ValueError(f"ffn: expected {{type: swiglu, hidden: N}}, swiglu or none, got {self.ffn!r}")
        ffn = self.ffn_spec()
        if ffn["type"] not in FFN_TYPES:
            raise ValueError(f"ffn.type: unknown {ffn['type']!r}; use one of {FFN_TYPES}")
        if ffn["type"] == "swiglu" and not (isinstance(ffn["hidden"], int) and not isinstance(ffn["hidden"], bool)
                                            and ffn["hidden"] > 0):
            raise ValueError(f"ffn.hidden: must be a positive integer, got {ffn['hidden']!r}")
        if self.moe is not None:
            if not isinstance(self.moe, dict):
                raise ValueError(f"moe: expected a dict {{every, n_experts, top_k}} or null, got {self.moe!r}")
            moe = self.moe_spec()
            for key in ("every", "n_experts", "top_k", "hidden"):
                if not isinstance(moe[key], int) or isinstance(moe[key], bool) or moe[key] <= 0:
                    raise ValueError(f"moe.{key}: must be a positive integer, got {moe[key]!r}")
            if moe["top_k"] > moe["n_experts"]:
                raise ValueError(f"moe.top_k: {moe['top_k']} is larger than moe.n_experts {moe['n_experts']}; "
                                 f"choose top_k <= n_experts")
            if not 0 <= moe["offset"] < moe["every"]:
                raise ValueError(f"moe.offset: must be in [0, moe.every) = [0, {moe['every']}), got {moe['offset']}")
            if not 0 <= moe["aux_loss_coef"] < math.inf:  # (NaN too: it made every training loss NaN)
                raise ValueError(f"moe.aux_loss_coef: must be a finite number >= 0, got {moe['aux_loss_coef']}")
        specs = self.layer_specs()
        pattern = [c for c in self.layers if not c.isspace()] if isinstance(self.layers, str) else None
        for i, spec in enumerate(specs):
            where = f"layers[{i}]"
            # a pattern's letters name the `mixers` entry the user wrote
            at = f"mixers.{pattern[i]}" if isinstance(self.layers, str) else where
            ffn_type = spec.get("ffn")
            if ffn_type not in ("swiglu", "moe", "none"):
                raise ValueError(f"{at}.ffn: unknown {ffn_type!r}; use swiglu, moe or none")
            if ffn_type == "moe" and self.moe is None:
                raise ValueError(f"{at}.ffn: 'moe' needs a top-level `moe:` section")
            if ffn_type == "swiglu" and ffn["type"] == "none":
                raise ValueError(f"{at}.ffn: 'swiglu' needs a top-level `ffn:` with a hidden size")
            mixer_type = spec.get("type")
            if not isinstance(mixer_type, str):
                raise ValueError(f"{at}.type: expected a mixer name (mamba, mamba2, attention, gla) or a dotted "
                                 f"import path, got {mixer_type!r}")
            if is_dotted_path(mixer_type):
                continue  # resolved (and trusted or refused) when the model is built
            try:
                cls = get_mixer(mixer_type)
            except ValueError as e:
                raise ValueError(f"{at}.type: {e}") from None
            check_mixer_options(cls, spec, self.d_model, at, where)
        used = set(pattern) if pattern is not None else set()
        for letter, spec in (self.mixers or {}).items():
            # a letter no layer uses: its options are checked when a pattern takes it, its type now (a misspelled
            # type in a base config's spare entry passed until a pattern used it)
            if letter in used or not isinstance(spec["type"], str) or is_dotted_path(spec["type"]):
                continue
            try:
                get_mixer(spec["type"])
            except ValueError as e:
                raise ValueError(f"mixers.{letter}.type: {e}") from None
        if self.moe is not None and not any(spec["ffn"] == "moe" for spec in specs):
            moe = self.moe_spec()
            raise ValueError(f"moe: none of the {len(specs)} layers gets experts (a layer does when its index % "
                             f"moe.every ({moe['every']}) == moe.offset ({moe['offset']}) and it sets no ffn of "
                             f"its own, or when it sets ffn: moe); choose a moe.every / moe.offset that picks a "
                             f"layer, or drop the moe section")

    def validate(self) -> None:
        """transformers' check of a config before save_pretrained writes it: its own validators, then validate_zoo,
        so that a field set to a bad value after the config was made is refused before config.json is written (it
        was written, and the folder then failed to load)."""
        super().validate()
        self.validate_zoo()

    # ---- io ---------------------------------------------------------------------------------------------
    @classmethod
    def check_fields(cls, data: dict, where: str = "") -> None:
        """Raise ValueError naming the first key of `data` (a config written by hand: YAML, a comparison's
        overrides) that is no config field, with the closest field. (Python keyword arguments and config.json
        are left to transformers' rule: unknown keys become attributes.)"""
        own = [name for name in cls.__annotations__ if not name.startswith("_")]
        inherited = {f.name for f in dataclasses.fields(cls)} | set(cls.attribute_map)
        # transformers' settable properties a zoo model reads: num_labels sizes ZooForSequenceClassification's head
        inherited |= {"model_type", "num_hidden_layers", "num_labels"}
        problem = _unknown_key([k for k in data if k not in inherited], own, where)
        if problem:
            raise ValueError(problem)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> ZooConfig:
        """Read a model config from YAML; keyword overrides replace top-level fields. Raises ValueError naming
        a field that is not a config field (a typo would otherwise leave its default in place).

        path: a YAML file, or a packaged model config by name (``jamba-tiny``, ``configs/models/jamba-tiny.yaml``
        from any working directory: zoo.config_files' rule)."""
        import yaml

        from zoo.config_files import find_config

        path = find_config(path, "models")
        with open(path) as f:
            data = yaml.safe_load(f)
        if not isinstance(data, dict):  # an empty file too: it built the default 768-wide model without a word
            raise ValueError(f"{path}: expected a YAML mapping of config fields, got "
                             f"{'an empty file' if data is None else type(data).__name__}")
        for key in overrides:  # an override under either name replaces the field (not a disagreement with the file)
            for alias, name in ALIASES.items():
                if key in (alias, name):
                    data.pop(name if key == alias else alias, None)
        data.update(overrides)
        cls.check_fields(data, f"{path}: ")
        return cls(**data)

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs) -> tuple[dict[str, Any], dict[str, Any]]:
        """transformers' reading of config.json (what ZooForCausalLM.from_pretrained reads), refusing another model's:
        a transformers Mamba / Llama folder or a mamba_ssm one became zoo's default model ("MM", its fields ignored)
        with every weight left at random, after only transformers' log line and load report."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        found = config_dict.get("model_type")
        nested = any(isinstance(v, dict) and v.get("model_type") == cls.model_type for v in config_dict.values())
        if found is None and {"d_model", "n_layer"} <= set(config_dict):
            found = "mamba_ssm"
        if found not in (None, cls.model_type) and not nested:
            raise ValueError(f"{pretrained_model_name_or_path}: its config.json is a {found!r} model's, not a zoo "
                             f"model's, so none of its weights would load into a zoo model. Convert it first: zoo "
                             f"convert SRC DST (or zoo.convert.load_as_zoo(SRC)) reads transformers' mamba, mamba2, "
                             f"llama and jamba checkpoints and mamba_ssm's"
                             + ("" if found == "mamba_ssm" else f"; AutoModelForCausalLM loads it as a {found!r} "
                                                                 f"model"))
        return config_dict, kwargs

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        # transformers sets the keywords one after the other: of from_pretrained(path, hidden_size=32, d_model=64), the
        # last one won without a word, where the constructor refuses the two
        for alias, name in ALIASES.items():
            if kwargs.get(alias) is not None and kwargs.get(name) is not None:
                _agreeing_alias(alias, kwargs[alias], _coerce(kwargs[name], FIELD_TYPES[name], name))
        config = super().from_dict(config_dict, **kwargs)
        result = config[0] if isinstance(config, tuple) else config
        # A config read from disk or the hub must not import code by itself (see registry.get_mixer).
        result._from_disk = True
        # transformers sets the keyword overrides of from_pretrained (decode_state_dtype="...") with setattr
        # after construction, past __post_init__: check them as a constructor argument would be
        result.validate_zoo()
        result.set_num_hidden_layers(kwargs.get("num_hidden_layers"))
        return config

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("_from_disk", None)
        out.pop("num_hidden_layers", None)
        # transformers' name too: PEFT reads it from this dict to tie adapters of a tied lm_head (trainable tokens)
        out["tie_word_embeddings"] = self.tie_embeddings
        # PEFT's prompt learning (prompt tuning, P-tuning) reads it from this dict and raised "Please specify
        # `num_attention_heads`" without the key; None (no attention layer) is honest, and only prefix tuning uses it
        out["num_attention_heads"] = self.attention_heads()
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        out = super().to_diff_dict()
        out.pop("tie_word_embeddings", None)  # config.json keeps the one name, tie_embeddings
        out.pop("num_attention_heads", None)  # derived from mixers
        return out


__all__ = ["ZooConfig"]
