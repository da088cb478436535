"""hybrid-zoo: a Hugging Face model zoo of interchangeable sequence mixers.

`import zoo` registers ZooConfig ("zoo") with AutoConfig and the models with AutoModel, AutoModelForCausalLM and
AutoModelForSequenceClassification, so `from_pretrained` needs no trust_remote_code.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from zoo.cache import ZooCache
from zoo.config import ZooConfig
from zoo.modeling import ZooForCausalLM, ZooForSequenceClassification, ZooModel, ZooPreTrainedModel
from zoo.registry import get_mixer, list_mixers, register_mixer

AutoConfig.register("zoo", ZooConfig, exist_ok=True)
AutoModel.register(ZooConfig, ZooModel, exist_ok=True)
AutoModelForCausalLM.register(ZooConfig, ZooForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(ZooConfig, ZooForSequenceClassification, exist_ok=True)
# transformers' Trainer shifts the labels of its label smoother (label_smoothing_factor) only for the causal LMs named
# in this table, which `register` leaves alone; unshifted, the smoothed loss trained each position to copy its own token
MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault("zoo", "ZooForCausalLM")


# PEFT's default (IA)^3 targets of a zoo model, after llama's (the keys and values, and the FFN's hidden activations:
# the input of its down_proj, experts' included): attention's and GLA's k_proj and v_proj, scaled on their output; the
# Mamba and Mamba-2 mixers' in_proj (their x, gate and, for Mamba-2, B, C and dt) scaled on its output and their
# out_proj on its input (the gated scan output, the mixer's hidden activations as down_proj's are the FFN's)
IA3_TARGETS = ("k_proj", "v_proj", "in_proj", "out_proj", "down_proj")
IA3_FEEDFORWARD = ("out_proj", "down_proj")
# LN tuning's, as llama's (every norm): each block's norm and ffn_norm, the final norm_f, the gated output norms
# of Mamba-2 (mixer.norm, matched by "norm") and GLA (mixer.g_norm), and the RMSNorms on dt, B and C of a Mamba mixer
# with Jamba's inner_norms (a converted Jamba's; left out, LNTuningConfig() kept those three frozen)
LN_TUNING_TARGETS = ("norm", "ffn_norm", "norm_f", "g_norm", "dt_layernorm", "b_layernorm", "c_layernorm")


def _register_peft_default_targets() -> None:
    """PEFT picks LoRA's default targets (a LoraConfig without target_modules) by model_type, as it does for llama or
    mamba: "zoo" gets every mixer's projections (their `lora_targets`), in a list the registry keeps current as
    mixers are registered (zoo.registry.LORA_TARGETS).

    PEFT also tells a tied input embedding by its module name (EMBEDDING_LAYER_NAMES: embed_tokens, lm_head), next to
    the model's _tied_weights_keys; zoo's is "embeddings" (as in transformers' Mamba). Unnamed there, LoraConfig's
    ensure_weight_tying was ignored for it (its trained copy left the tied lm_head on the base rows) and an adapter
    on it came without PEFT's tied-layer warnings."""
    import peft.utils.constants as peft_constants
    from peft.utils.constants import EMBEDDING_LAYER_NAMES, TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    from zoo.registry import LORA_TARGETS

    list_mixers()  # registers the built-in mixers
    lora = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    lora.setdefault("zoo", LORA_TARGETS)
    # the methods whose tables PEFT copied from LoRA's (LoHa, LoKr, AdaLoRA, OFT, ...: the same targets for llama) get
    # them too: without, their configs without target_modules failed on a zoo model ("Please specify target_modules")
    for name in dir(peft_constants):
        table = getattr(peft_constants, name)
        if name.endswith("_TARGET_MODULES_MAPPING") and isinstance(table, dict) and table is not lora \
                and "llama" in table and table.get("llama") == lora.get("llama"):
            table.setdefault("zoo", LORA_TARGETS)
    if "embeddings" not in EMBEDDING_LAYER_NAMES:  # the list PEFT's modules imported: extended in place
        EMBEDDING_LAYER_NAMES.append("embeddings")
    # (IA)^3 and LN tuning have tables of their own (llama: k_proj, v_proj and down_proj, down_proj scaled on its input;
    # every norm), which had no "zoo": IA3Config() and LNTuningConfig() failed on a zoo model ("Please specify
    # `target_modules` in `peft_config`"), where they work on a llama. Each looked up leniently: a PEFT without one
    # (peft is not capped above) failed every `import zoo` with an AttributeError
    for name, targets in (("TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING", IA3_TARGETS),
                          ("TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING", IA3_FEEDFORWARD),
                          ("TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING", LN_TUNING_TARGETS)):
        if isinstance(table := getattr(peft_constants, name, None), dict):
            table.setdefault("zoo", list(targets))


_register_peft_default_targets()

# PEFT's methods that hand the model a transformers cache of trained keys and values for every layer
_KV_PREFIX_METHODS = ("PREFIX_TUNING", "CARTRIDGE")


def _refuse_peft_prefix_tuning() -> None:
    """PEFT's prefix tuning (and cartridges) on a zoo model is refused when the adapter is added (get_peft_model,
    PeftModel.from_pretrained), naming the model's mixers: on a model without attention layers (Mamba, Mamba-2, GLA)
    it crashed inside PEFT's get_prompt at the first forward ('unsupported operand type(s) for //: 'int' and
    'NoneType''), and on one with attention layers its transformers cache of virtual keys and values was refused by
    the forward only (a ZooCache holds the recurrent states as well, in its own layout). Prompt tuning and P-tuning
    prepend virtual token embeddings instead and work on every zoo model."""
    import functools

    from peft import PeftModel

    original = PeftModel.add_adapter
    if getattr(original, "_refuses_prefix_tuning_on_zoo", False):
        return

    @functools.wraps(original)
    def add_adapter(self, adapter_name, peft_config, *args, **kwargs):
        base = self._modules.get("base_model")
        base = getattr(base, "model", base)  # a tuner's (LoraModel's) model; prompt learning holds the model itself
        if isinstance(base, ZooPreTrainedModel) and getattr(peft_config, "peft_type", None) in _KV_PREFIX_METHODS:
            raise ValueError(_prefix_tuning_refusal(base.config, peft_config.peft_type.value))
        return original(self, adapter_name, peft_config, *args, **kwargs)

    add_adapter._refuses_prefix_tuning_on_zoo = True
    PeftModel.add_adapter = add_adapter


def _prefix_tuning_refusal(config: ZooConfig, method: str = "PREFIX_TUNING") -> str:
    """Why PEFT's `method` (prefix tuning: trained keys and values in front of every layer's attention cache) does not
    apply to the zoo model of `config`, and what does."""
    types = list(dict.fromkeys(spec["type"] for spec in config.layer_specs()))
    if "attention" not in types:
        why = (f"this zoo model has no attention layers (its mixers: {', '.join(types)}), so it has no attention "
               f"cache to prepend them to")
    else:
        why = (f"this zoo model (its mixers: {', '.join(types)}) keeps its attention keys and values, with any "
               f"recurrent states, in a ZooCache of its own layout, which PEFT's transformers cache does not fill")
    return (f"PEFT's {method} prepends trained keys and values to every layer's attention cache; {why}. Use LoRA "
            f"(peft.LoraConfig, zoo.finetune.wrap_lora, zoo finetune), or prompt tuning (PromptTuningConfig) or "
            f"P-tuning (PromptEncoderConfig), which prepend virtual token embeddings and work on every zoo model")


_refuse_peft_prefix_tuning()

__version__ = "0.1.0"

__all__ = ["ZooCache", "ZooConfig", "ZooForCausalLM", "ZooForSequenceClassification", "ZooModel", "get_mixer",
           "list_mixers", "register_mixer"]
