"""hybrid-zoo: a Hugging Face model zoo of interchangeable sequence mixers.

`import zoo` registers ZooConfig ("zoo") with AutoConfig and the models with AutoModel, AutoModelForCausalLM and
AutoModelForSequenceClassification, so `from_pretrained` needs no trust_remote_code.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from zoo.cache import ZooCache
from zoo.config import ZooConfig
from zoo.modeling import ZooForCausalLM, ZooForSequenceClassification, ZooModel
from zoo.registry import get_mixer, list_mixers, register_mixer

AutoConfig.register("zoo", ZooConfig, exist_ok=True)
AutoModel.register(ZooConfig, ZooModel, exist_ok=True)
AutoModelForCausalLM.register(ZooConfig, ZooForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(ZooConfig, ZooForSequenceClassification, exist_ok=True)
# transformers' Trainer shifts the labels of its label smoother (label_smoothing_factor) only for the causal LMs named
# in this table, which `register` leaves alone; unshifted, the smoothed loss trained each position to copy its own token
MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault("zoo", "ZooForCausalLM")


def _register_peft_default_targets() -> None:
    """PEFT picks LoRA's default targets (a LoraConfig without target_modules) by model_type, as it does for llama or
    mamba: "zoo" gets every mixer's projections (their `lora_targets`), in a list the registry keeps current as
    mixers are registered (zoo.registry.LORA_TARGETS).

    PEFT also tells a tied input embedding by its module name (EMBEDDING_LAYER_NAMES: embed_tokens, lm_head), next to
    the model's _tied_weights_keys; zoo's is "embeddings" (as in transformers' Mamba). Unnamed there, LoraConfig's
    ensure_weight_tying was ignored for it (its trained copy left the tied lm_head on the base rows) and an adapter
    on it came without PEFT's tied-layer warnings."""
    from peft.utils.constants import EMBEDDING_LAYER_NAMES, TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    from zoo.registry import LORA_TARGETS

    list_mixers()  # registers the built-in mixers
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.setdefault("zoo", LORA_TARGETS)
    if "embeddings" not in EMBEDDING_LAYER_NAMES:  # the list PEFT's modules imported: extended in place
        EMBEDDING_LAYER_NAMES.append("embeddings")


_register_peft_default_targets()

__version__ = "0.1.0"

__all__ = ["ZooCache", "ZooConfig", "ZooForCausalLM", "ZooForSequenceClassification", "ZooModel", "get_mixer",
           "list_mixers", "register_mixer"]
