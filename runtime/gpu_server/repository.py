"""The model repository: one folder per model, registered apart from actions.

A model folder holds ``model.json`` — how to build the model and what it takes — and its
weights::

    {"name": "resnet50", "architecture": "tv-resnet50", "config": {},
     "format": "safetensors", "weights": "model.safetensors",
     "inputs": [{"name": "x", "dtype": "float32", "shape": [1, 3, 224, 224]}]}

``format`` is ``safetensors`` (architecture + config + safetensors weights), ``state_dict``
(architecture + config + a ``torch.load(weights_only=True)`` file) or ``export`` (a
``torch.export`` program saved with ``torch.export.save``; no architecture needed). A ``null``
in an input shape is a dynamic dimension. Nothing is ever unpickled without
``weights_only``.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
import torch
from torch import nn

from runtime.gpu_server import zoo
from runtime.settings import from_kwargs, options, setting

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8, "bool": torch.bool}
FORMATS = ("safetensors", "state_dict", "export")
EXAMPLE_DYNAMIC_DIM = 8  # size given to a dynamic dimension in the registration trace


class ModelLoadError(Exception):
    """A model cannot be registered or loaded; the message names the cause."""


@dataclass
class TensorSpec:
    """One input: name, dtype name (``float32``...) and shape (``None`` = dynamic dim)."""

    name: str
    dtype: str
    shape: list[int | None]

    def example(self) -> torch.Tensor:
        shape = [EXAMPLE_DYNAMIC_DIM if d is None else d for d in self.shape]
        dtype = DTYPES[self.dtype]
        if dtype.is_floating_point:
            return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
        return torch.ones(shape, dtype=dtype)


@dataclass
class ModelSpec:
    """The content of ``model.json`` plus where it lives."""

    name: str
    inputs: list[TensorSpec]
    format: str = "safetensors"
    architecture: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    weights: str = "model.safetensors"
    digest: str = ""
    bytes: int = 0
    path: str = ""

    @classmethod
    def read(cls, folder: Path) -> "ModelSpec":
        """Parses ``folder/model.json``.

        Raises:
            ModelLoadError: missing or malformed file, unknown format or dtype.
        """
        try:
            raw = json.loads((folder / "model.json").read_text())
            raw["inputs"] = [TensorSpec(**i) for i in raw.get("inputs", [])]
            spec = cls(**{**raw, "path": str(folder)})
        except (OSError, ValueError, TypeError) as exc:
            raise ModelLoadError(f"{folder}/model.json is not a valid model description: {exc}") from exc
        if spec.format not in FORMATS:
            raise ModelLoadError(f"model {spec.name}: unknown format {spec.format!r} (one of {', '.join(FORMATS)})")
        for i in spec.inputs:
            if i.dtype not in DTYPES:
                raise ModelLoadError(f"model {spec.name}: input {i.name} has unknown dtype {i.dtype!r}")
        if spec.format != "export" and not spec.architecture:
            raise ModelLoadError(f"model {spec.name}: format {spec.format} needs an architecture")
        return spec

    def write(self, folder: Path) -> None:
        data = asdict(self)
        data.pop("path")
        (folder / "model.json").write_text(json.dumps(data, indent=1))


def build(spec: ModelSpec) -> nn.Module:
    """Builds the CPU module of ``spec`` with its weights loaded strictly, in eval mode.

    Raises:
        ModelLoadError: unknown architecture, missing/truncated weights, names or shapes that
            do not match the architecture, an export that does not load.
    """
    path = Path(spec.path) / spec.weights
    try:
        if spec.format == "export":
            module = torch.export.load(str(path)).module()
        else:
            module = zoo.build(spec.architecture, spec.config)
            if spec.format == "safetensors":
                from safetensors.torch import load_model
                load_model(module, str(path), strict=True)
            else:
                state = torch.load(str(path), map_location="cpu", weights_only=True)
                module.load_state_dict(state, strict=True)
    except ModelLoadError:
        raise
    except Exception as exc:  # the loaders raise many types; all mean "this model does not load"
        raise ModelLoadError(f"model {spec.name} does not load: {type(exc).__name__}: {exc}") from exc
    if spec.format == "export":  # the export fixed the mode; its module refuses .eval()
        return module.requires_grad_(False)
    return module.eval().requires_grad_(False) if isinstance(module, nn.Module) else module


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Repository:
    """A local model repository directory (``TORPOR_MODEL_REPO``).

    Args:
        root: the directory; created when missing.
    """

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def folder(self, name: str) -> Path:
        if not name or "/" in name or name.startswith("."):
            raise ModelLoadError(f"invalid model name {name!r}")
        return self.root / name

    def spec(self, name: str) -> ModelSpec:
        """The registered spec of ``name``.

        Raises:
            KeyError: no such model.
            ModelLoadError: its description is broken.
        """
        folder = self.folder(name)
        if not (folder / "model.json").exists():
            raise KeyError(name)
        return ModelSpec.read(folder)

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if (p / "model.json").exists())

    def register(self, spec: ModelSpec, weights_file: Path) -> ModelSpec:
        """Validates ``spec`` + ``weights_file`` (builds, loads strictly, runs the example
        inputs once) and only then installs them as ``root/NAME``. Nothing is left behind
        when validation fails.

        Raises:
            ModelLoadError: the model does not build, load or run.
        """
        final = self.folder(spec.name)
        staging = self.root / f".staging-{spec.name}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            shutil.copyfile(weights_file, staging / spec.weights)
            spec.path = str(staging)
            spec.digest = file_digest(staging / spec.weights)
            module = build(spec)
            try:
                with torch.no_grad():
                    module(*[i.example() for i in spec.inputs])
            except Exception as exc:  # any failure of the forward pass means the inputs do not fit
                raise ModelLoadError(f"model {spec.name} does not run on its declared inputs: {type(exc).__name__}: {exc}") from exc
            from runtime.gpu_server.layout import named_weights
            spec.bytes = sum(t.numel() * t.element_size() for t in {id(t): t for t in named_weights(module).values()}.values())
            spec.write(staging)
            shutil.rmtree(final, ignore_errors=True)
            staging.rename(final)
            spec.path = str(final)
            return spec
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def unregister(self, name: str) -> None:
        """Removes ``name``'s folder.

        Raises:
            KeyError: no such model.
        """
        folder = self.folder(name)
        if not folder.exists():
            raise KeyError(name)
        shutil.rmtree(folder)


def parse_input(text: str) -> TensorSpec:
    """``name:dtype:d0xd1x...`` (``?`` for a dynamic dim) → TensorSpec."""
    try:
        name, dtype, dims = text.split(":")
        return TensorSpec(name, dtype, [None if d == "?" else int(d) for d in dims.split("x")])
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected name:dtype:d0xd1x... e.g. x:float32:1x3x224x224") from None


@dataclass
class RepositorySettings:
    """Where the model repository is and which GPU server to tell about new models."""

    model_repo: str = setting(".state/models", "TORPOR_MODEL_REPO", "model repository directory")
    gpu_socket: str = setting("", "TORPOR_GPU_SOCKET", "GPU server socket to load a new model into (empty: none)")
    redis_url: str = setting("", "TORPOR_REDIS_URL", "Redis to record the model in (empty: none)")


@click.group("model")
def command() -> None:
    """Register, list and remove models of the repository."""


@command.command("register")
@click.argument("name")
@click.option("--architecture", help="architecture from the zoo (not for --format export)")
@click.option("--config", "config_json", default="{}", help="architecture config as JSON")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), required=True)
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="safetensors")
@click.option("--input", "inputs", multiple=True, required=True, help="name:dtype:d0xd1x... (repeatable)")
@options(RepositorySettings)
def register_command(name, architecture, config_json, weights, fmt, inputs, **kwargs) -> None:
    """Validate a model and add it to the repository as NAME."""
    settings = from_kwargs(RepositorySettings, kwargs)
    spec = ModelSpec(name=name, inputs=[parse_input(i) for i in inputs], format=fmt, architecture=architecture,
                     config=json.loads(config_json), weights=Path(weights).name if fmt != "safetensors" else "model.safetensors")
    try:
        spec = Repository(settings.model_repo).register(spec, Path(weights))
    except ModelLoadError as exc:
        raise click.ClickException(str(exc)) from exc
    announce(spec, settings)
    click.echo(json.dumps({"name": spec.name, "bytes": spec.bytes, "digest": spec.digest}))


def announce(spec: ModelSpec, settings: RepositorySettings) -> None:
    """Records ``spec`` in Redis and asks the GPU server to load it, where configured."""
    if settings.redis_url:
        import redis
        redis.Redis.from_url(settings.redis_url).hset("torpor:models", spec.name, json.dumps(
            {"name": spec.name, "path": spec.path, "architecture": spec.architecture, "bytes": spec.bytes,
             "digest": spec.digest, "inputs": [asdict(i) for i in spec.inputs]}))
    if settings.gpu_socket:
        from runtime.client import GPUServerClient
        GPUServerClient(settings.gpu_socket).register(spec.name)


@command.command("list")
@options(RepositorySettings)
def list_command(**kwargs) -> None:
    """List the models of the repository."""
    settings = from_kwargs(RepositorySettings, kwargs)
    repo = Repository(settings.model_repo)
    for name in repo.names():
        spec = repo.spec(name)
        click.echo(f"{name}\t{spec.format}\t{spec.architecture or '-'}\t{spec.bytes}")
