"""Config groups only `lep-megatron pretrain` composes (model shapes, clusters); see conf/pretrain.yaml."""
