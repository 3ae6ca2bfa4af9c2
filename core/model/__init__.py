"""The composed MedPLIB model (a transformers `PreTrainedModel`), its tokens, template, presets and loaders.

Importing this package registers `MedPLIBConfig` / `MedPLIBForCausalLM` with `AutoConfig`,
`AutoModel` and `AutoModelForCausalLM`.
"""

from medplib.core.model.configuration_medplib import MedPLIBConfig, MedPLIBSamConfig
from medplib.core.model.conversation import Turn, decode_answer, encode_conversation
from medplib.core.model.generation import GenerationOutput
from medplib.core.model.loading import load_llava_and_sam
from medplib.core.model.modeling_medplib import MaskPrediction, MedPLIBForCausalLM, MedPLIBOutput
from medplib.core.model.presets import MODEL_PRESETS, build_config, build_medplib
from medplib.core.model.processing import MedPLIBProcessor, Request
from medplib.core.model.tokenizer import ControlToken, tiny_tokenizer, tokenize_user_text

__all__ = [
    "MODEL_PRESETS",
    "ControlToken",
    "GenerationOutput",
    "MaskPrediction",
    "MedPLIBConfig",
    "MedPLIBForCausalLM",
    "MedPLIBOutput",
    "MedPLIBProcessor",
    "MedPLIBSamConfig",
    "Request",
    "Turn",
    "build_config",
    "build_medplib",
    "decode_answer",
    "encode_conversation",
    "load_llava_and_sam",
    "tiny_tokenizer",
    "tokenize_user_text",
]
