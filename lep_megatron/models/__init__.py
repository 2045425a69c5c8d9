from lep_megatron.models.gpt import (build_gpt_model, build_stage_model, padded_vocab_size,
                                     stage_layer_offset, transformer_config)
from lep_megatron.models.hf_config import HFModelShape
from lep_megatron.models.state_dict_adapter import StateDictAdapter, tp_shard

__all__ = ["HFModelShape", "StateDictAdapter", "build_gpt_model", "build_stage_model",
           "padded_vocab_size", "stage_layer_offset", "tp_shard", "transformer_config"]
