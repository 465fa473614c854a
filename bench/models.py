"""The bench model set (issue 3): name → (architecture in runtime/gpu_server/zoo.py, config,
input specs). Batch 1; images 1×3×224×224 float32, BERT-large 1×512 tokens, GPT-2-large 1×128
tokens. Shared by bench/swap.py and bench/node.py so that both measure the same models."""
from __future__ import annotations

from runtime.gpu_server.repository import TensorSpec

IMAGE = [TensorSpec("x", "float32", [1, 3, 224, 224])]
MODELS = {
    "resnet50": ("tv-resnet50", {}, IMAGE),
    "resnet101": ("tv-resnet101", {}, IMAGE),
    "resnet152": ("tv-resnet152", {}, IMAGE),
    "densenet169": ("tv-densenet169", {}, IMAGE),
    "densenet201": ("tv-densenet201", {}, IMAGE),
    "inception_v3": ("tv-inception_v3", {"aux_logits": False, "init_weights": False}, IMAGE),
    "efficientnet_b0": ("tv-efficientnet_b0", {}, IMAGE),
    "bert-large": ("bert-qa", {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                               "intermediate_size": 4096}, [TensorSpec("input_ids", "int64", [1, 512])]),
    "vit_l_16": ("tv-vit_l_16", {}, IMAGE),
    "gpt2-large": ("gpt2", {"n_embd": 1280, "n_layer": 36, "n_head": 20}, [TensorSpec("input_ids", "int64", [1, 128])]),
}
CNNS = ("resnet50", "resnet101", "resnet152", "densenet169", "densenet201", "inception_v3", "efficientnet_b0")
