"""Tiny models of real architectures (runtime/gpu_server/zoo.py) for the GPU-server tests:
built with seeded random weights, saved as safetensors, registered into a Repository, and
run natively to give the outputs a served call must reproduce."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_model
from torch import nn

from runtime.gpu_server import zoo
from runtime.gpu_server.executor import flatten
from runtime.gpu_server.layout import named_weights
from runtime.gpu_server.repository import ModelSpec, Repository, TensorSpec


@dataclass(frozen=True)
class Tiny:
    """A zoo architecture at a tiny size: its config and its inputs ``(name, dtype, shape)``."""

    architecture: str
    config: dict
    inputs: tuple[tuple[str, str, tuple[int, ...]], ...]
    vocab: int = 0  # int64 inputs are token ids below this


TINY = {
    "resnet": Tiny("resnet", dict(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                  layer_type="basic", num_labels=10),
                   (("pixel_values", "float32", (1, 3, 32, 32)),)),
    # tie_word_embeddings is GPT-2's default: lm_head.weight is transformer.wte.weight
    "gpt2": Tiny("gpt2", dict(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0,
                                   eos_token_id=0),
                 (("input_ids", "int64", (1, 8)),), vocab=64),
    # logits of 80 x 65536 float32 (20 MiB): more than a client's default shared-memory segment
    "gpt2-wide": Tiny("gpt2", dict(vocab_size=65536, n_positions=80, n_embd=8, n_layer=1, n_head=2, bos_token_id=0,
                                   eos_token_id=0),
                      (("input_ids", "int64", (1, 80)),), vocab=65536),
    "sentence-embedding": Tiny("sentence-embedding", dict(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                                          num_attention_heads=2, intermediate_size=32,
                                                          max_position_embeddings=32),
                               (("input_ids", "int64", (1, 8)), ("attention_mask", "int64", (1, 8))), vocab=64),
    "vit": Tiny("vit", dict(image_size=16, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=1,
                            num_attention_heads=2, intermediate_size=32, num_labels=5),
                (("pixel_values", "float32", (1, 3, 16, 16)),)),
}
SMALL = ("gpt2", "resnet", "sentence-embedding", "vit")  # a few KB of weights each


def build(kind: str, seed: int = 0, config: dict | None = None) -> nn.Module:
    """The CPU module of ``TINY[kind]`` (``config`` overrides merged in) with weights drawn
    from ``seed``; batch-norm running statistics are randomised too, so that buffers matter."""
    tiny = TINY[kind]
    torch.manual_seed(seed)
    module = zoo.build(tiny.architecture, {**tiny.config, **(config or {})})
    gen = torch.Generator().manual_seed(seed + 1)
    for mod in module.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=gen) * 0.1)
            mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=gen) + 0.5)
    return module


def spec(name: str, kind: str, config: dict | None = None) -> ModelSpec:
    """The repository description of a ``TINY[kind]`` model called ``name``."""
    tiny = TINY[kind]
    return ModelSpec(name=name, architecture=tiny.architecture, config={**tiny.config, **(config or {})},
                     inputs=[TensorSpec(n, d, list(s)) for n, d, s in tiny.inputs])


def save(module: nn.Module, path: Path) -> Path:
    """Writes ``module``'s weights to the safetensors file ``path`` (tied weights once)."""
    save_model(module, str(path))
    return path


def register(repo: Repository, name: str, kind: str, seed: int = 0, config: dict | None = None) -> nn.Module:
    """Registers a fresh ``TINY[kind]`` model as ``name`` in ``repo``; returns its native module."""
    module = build(kind, seed, config)
    weights = save(module, Path(repo.root).parent / f"{name}-{seed}.safetensors")
    repo.register(spec(name, kind, config), weights)
    return module


def inputs(kind: str, seed: int = 0, shapes: dict[str, tuple[int, ...]] | None = None) -> list[np.ndarray]:
    """Random valid inputs of ``TINY[kind]`` (token ids below its vocabulary; attention masks
    with a padded tail), optionally with other ``shapes`` by input name."""
    tiny = TINY[kind]
    rng = np.random.default_rng(seed)
    out = []
    for name, dtype, shape in tiny.inputs:
        shape = (shapes or {}).get(name, shape)
        if name == "attention_mask":
            a = np.ones(shape, dtype=np.int64)
            a[..., shape[-1] * 3 // 4:] = 0
        elif dtype == "int64":
            a = rng.integers(0, tiny.vocab, size=shape, dtype=np.int64)
        else:
            a = rng.standard_normal(shape).astype(dtype)
        out.append(a)
    return out


def native(module: nn.Module, arrays: list[np.ndarray]) -> list[np.ndarray]:
    """``module``'s outputs on ``arrays``, run the ordinary way (own weights, no server)."""
    with torch.inference_mode():
        return [o.numpy() for o in flatten(module(*[torch.from_numpy(a) for a in arrays]))]


def weight_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s distinct weights (tied ones counted once)."""
    unique = {t.untyped_storage().data_ptr(): t for t in named_weights(module).values()}
    return sum(t.numel() * t.element_size() for t in unique.values())


def assert_same(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    """Bitwise equality of two output lists (same count, dtypes, shapes and bytes)."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g, w)


@contextlib.contextmanager
def torch_threads(n: int):
    """Runs the block with ``n`` intra-op torch threads. The tests use one: on a busy 2-core
    machine torch's thread pool makes a tiny model's forward pass 10-40x slower, and served
    and native runs must use the same count to give bitwise-equal outputs."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
