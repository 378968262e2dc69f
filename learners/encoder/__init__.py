"""A Hugging Face text encoder split into a frozen bottom and a trainable top.

The bottom layers never change, so their output for an item text is computed
once and cached (exact up to the cache dtype). Training and re-embedding only
run the top ``train_layers`` layers over the cached token states, which is
what makes fine-tuning affordable on a CPU. On CUDA the trainable top runs
under bf16 autocast (parameters stay fp32) and can use gradient
checkpointing; on CPU everything is fp32.

One job per module:

``model_folder``  family (encoder / decoder), pooling and prompt from the folder; loading it
``layers``        where the transformer layers, final norm and rotary table are
``pooling``       mean / CLS / last-token pooling, position ids, attention masks
``top_layers``    ``TopLayers``, the trainable top over cached bottom states
``train_params``  ``top`` / ``lora`` / ``full``: which layers train, building the top
``text_encoder``  ``TextEncoder``: tokenising, the frozen bottom's features, the split check
``precision``     device choice, bf16 autocast, cache dtypes

Everything public is re-exported here: ``from learners.encoder import ...`` keeps working.
"""

from learners.encoder.model_folder import (DECODER_TYPES, POOLINGS, EncoderSpec, is_decoder_config,
                                           load_hf_folder, read_spec)
from learners.encoder.pooling import cls_pool, last_token_pool, mean_pool, pool, position_ids_from_mask
from learners.encoder.precision import resolve_device
from learners.encoder.text_encoder import TextEncoder
from learners.encoder.top_layers import TopLayers
from learners.encoder.train_params import DEFAULT_LORA_TARGETS, TRAIN_PARAMS

__all__ = ["TextEncoder", "TopLayers", "EncoderSpec", "read_spec", "resolve_device", "mean_pool",
           "last_token_pool", "pool", "TRAIN_PARAMS", "DECODER_TYPES", "DEFAULT_LORA_TARGETS"]
