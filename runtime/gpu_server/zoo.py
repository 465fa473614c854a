"""Model architectures the repository can build: name → builder of an ``nn.Module``.

Every built module takes positional tensors and returns one tensor or a tuple of tensors, so
the GPU server can run any of them the same way. Hugging Face models come from
``transformers`` (present on every machine Torpor runs on); the torchvision classics
(``tv-resnet50``, ``tv-densenet201``...) are offered where ``torchvision`` imports.
Weights are never created here for serving: the repository loads them from safetensors.
"""
from __future__ import annotations

import threading
from typing import Any, Callable

import torch
from torch import nn


class HFOutput(nn.Module):
    """Wraps a Hugging Face model so that ``forward(*tensors)`` returns plain tensors.

    Args:
        model: a ``transformers`` model.
        fields: names of the output fields returned, in order (e.g. ``("logits",)``).
    """

    def __init__(self, model: nn.Module, fields: tuple[str, ...]):
        super().__init__()
        self.model = model
        self.fields = fields

    def forward(self, *inputs: torch.Tensor):
        out = self.model(*inputs, return_dict=True)
        values = tuple(getattr(out, f) for f in self.fields)
        return values[0] if len(values) == 1 else values


class SentenceEmbedding(nn.Module):
    """BERT encoder + mean pooling over the attention mask + L2 normalisation, as
    sentence-transformers' all-MiniLM-L6-v2 pipeline (Transformer → Pooling(mean) → Normalize).

    forward(input_ids int64 [B, T], attention_mask int64 [B, T]) → float32 [B, H], unit norm.
    """

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2, dim=1)


def _hf(config_cls: str, model_cls: str, fields: tuple[str, ...], **defaults: Any) -> Callable[[dict], nn.Module]:
    def build(config: dict) -> nn.Module:
        import transformers

        cfg = getattr(transformers, config_cls)(**{**defaults, **config})
        model = getattr(transformers, model_cls)(cfg)
        return HFOutput(model, fields)

    return build


def _sentence_embedding(config: dict) -> nn.Module:
    import transformers

    return SentenceEmbedding(transformers.BertModel(transformers.BertConfig(**config), add_pooling_layer=False))


def _torchvision(name: str) -> Callable[[dict], nn.Module]:
    def build(config: dict) -> nn.Module:
        import torchvision

        return torchvision.models.get_model(name, weights=None, **config)

    return build


ARCHITECTURES: dict[str, Callable[[dict], nn.Module]] = {
    "sentence-embedding": _sentence_embedding,
    "bert-qa": _hf("BertConfig", "BertForQuestionAnswering", ("start_logits", "end_logits")),
    "resnet": _hf("ResNetConfig", "ResNetForImageClassification", ("logits",)),
    "vit": _hf("ViTConfig", "ViTForImageClassification", ("logits",)),
    "efficientnet": _hf("EfficientNetConfig", "EfficientNetForImageClassification", ("logits",)),
    # no KV cache: a served call is one whole forward pass
    "gpt2": _hf("GPT2Config", "GPT2LMHeadModel", ("logits",), use_cache=False),
}
for _name in ("resnet50", "resnet101", "resnet152", "densenet169", "densenet201", "inception_v3",
              "efficientnet_b0", "vit_l_16", "vit_b_16"):
    ARCHITECTURES["tv-" + _name] = _torchvision(_name)


_BUILD_LOCK = threading.Lock()


def build(architecture: str, config: dict[str, Any] | None = None) -> nn.Module:
    """Builds ``architecture`` with ``config`` in eval mode with random weights, on the CPU
    or, inside ``with torch.device("meta")``, as a weightless skeleton (store.load).

    Raises:
        KeyError: unknown architecture (the message lists the known ones).
        ImportError: its library (torchvision) is not installed here.
        TypeError/ValueError: ``config`` does not fit the architecture.
    """
    try:
        builder = ARCHITECTURES[architecture]
    except KeyError:
        raise KeyError(f"unknown architecture {architecture!r}; known: {', '.join(sorted(ARCHITECTURES))}") from None
    if architecture.startswith("tv-"):  # torchvision builds are thread-safe: several at once
        module = builder(dict(config or {}))
    else:
        # transformers resolves its classes lazily, also while a model is being constructed,
        # and that import is not safe from several threads
        with _BUILD_LOCK:
            module = builder(dict(config or {}))
    return module.eval().requires_grad_(False)
