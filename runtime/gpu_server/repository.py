"""The model repository: one name per model, registered apart from actions.

A model is a folder holding ``model.json`` — how to build the model and what it takes — and
its weights::

    {"name": "resnet50", "architecture": "tv-resnet50", "config": {},
     "format": "safetensors", "weights": "model.safetensors",
     "inputs": [{"name": "x", "dtype": "float32", "shape": [1, 3, 224, 224]}]}

``format`` is ``safetensors`` (architecture + config + safetensors weights), ``state_dict``
(architecture + config + a ``torch.load(weights_only=True)`` file) or ``export`` (a
``torch.export`` program saved with ``torch.export.save``; no architecture needed). A ``null``
in an input shape is a dynamic dimension. Nothing is ever unpickled without
``weights_only``.

On disk (``TORPOR_MODEL_REPO``)::

    ROOT/NAME -> .versions/NAME-<32 hex>     a relative symlink: the current version
    ROOT/.versions/NAME-<32 hex>/            one folder per registration, never modified
        model.json, model.safetensors          once published
        layout.json [, extra.safetensors]      safetensors models: the traced layout (store.load)
    ROOT/.staging/NAME-<32 hex>/             a registration being validated
    ROOT/.staging/<32 hex>.link              the new symlink, just before it replaces ROOT/NAME

Publishing is atomic: a registration is built and validated in ``.staging``, renamed into
``.versions`` and then made current by renaming a new symlink over ``ROOT/NAME``
(``os.replace``, one ``rename(2)``). Unregistering unlinks the symlink (one ``unlink(2)``).
A reader therefore sees either the old version or the new one, never a mix nor a missing
file, provided it resolves ``ROOT/NAME`` once (:meth:`Repository.resolve`, which
:meth:`Repository.spec` uses) and reads every file from the resolved folder (``ModelSpec.path``,
which :func:`build` uses).

Old versions are collected by later registrations and unregistrations (:meth:`Repository.collect`),
in any process: a version no name points to is deleted once it has not been current for
``grace_s`` (default :data:`VERSION_GRACE_S`). A name never points to an old version again,
so a version found unreferenced stays so. A reader holds a version only between resolving
the link and opening its files (an open file survives its unlink on POSIX; the store then
keeps the weights in memory), which takes milliseconds, far less than the grace. Should a
reader still find its version gone, :class:`VersionGone` tells it to resolve again
(``ModelStore.get`` retries once). A plain folder at ``ROOT/NAME`` (written by hand or by
an older Torpor) is read as is; the next registration of NAME moves it into ``.versions``
first, the one step that is not atomic (a load running at that instant may fail once).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from runtime.gpu_server import zoo
from runtime.gpu_server.protocol import check_model_name
from runtime.gpu_server.layout import Layout, named_weights, trace_layout
from runtime.settings import from_kwargs, options, setting

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8, "bool": torch.bool}
FORMATS = ("safetensors", "state_dict", "export")
EXAMPLE_DYNAMIC_DIM = 8  # size given to a dynamic dimension in the registration trace
MAX_EXAMPLE_ELEMENTS = 1 << 31  # elements of one declared input (the registration example)
LAYOUT_FILE = "layout.json"  # a version's traced first-use layout (safetensors models)
EXTRA_WEIGHTS_FILE = "extra.safetensors"  # weights its safetensors file lacks (non-persistent buffers)
VERSIONS = ".versions"
STAGING = ".staging"
VERSION_GRACE_S = 300.0  # a superseded version is kept at least this long, s (module docstring)
STAGING_MAX_AGE_S = 86400.0  # a staging folder this old was left by a crashed registration, s


class ModelLoadError(Exception):
    """A model cannot be registered or loaded; the message names the cause."""


class VersionGone(ModelLoadError):
    """The version folder a reader resolved was collected before the reader opened its
    files: a newer version holds the name (or none does). Resolve the name again."""


@dataclass
class TensorSpec:
    """One input: name, dtype name (``float32``...) and shape (``None`` = dynamic dim).

    ``high`` and ``max_len`` are found at registration for integer inputs that index an
    embedding table (token ids): values must lie in ``[0, high)`` and a dynamic last
    dimension may be at most ``max_len`` (the model's position table). The GPU server checks
    both before a run: on a GPU an index out of range is a device-side assert, which poisons
    the device for every later call, not an error of the one request.
    """

    name: str
    dtype: str
    shape: list[int | None]
    high: int | None = None
    max_len: int | None = None

    def example(self) -> torch.Tensor:
        shape = [EXAMPLE_DYNAMIC_DIM if d is None else d for d in self.shape]
        dtype = DTYPES[self.dtype]
        if dtype.is_floating_point:
            return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
        return torch.ones(shape, dtype=dtype)


def check_inputs(inputs: list[TensorSpec]) -> None:
    """The rules every registration's declared inputs follow, whoever registers (the CLI, an
    uploaded program): distinct names, and at most :data:`MAX_EXAMPLE_ELEMENTS` elements each,
    since registration allocates an example of each and runs the model on it.

    Raises:
        ValueError: naming the input that breaks a rule.
    """
    names = [i.name for i in inputs]
    if len(set(names)) != len(names):
        raise ValueError(f"input names repeat: {', '.join(names)}")
    for i in inputs:
        if math.prod(EXAMPLE_DYNAMIC_DIM if d is None else d for d in i.shape) > MAX_EXAMPLE_ELEMENTS:
            raise ValueError(f"input {i.name} has more than {MAX_EXAMPLE_ELEMENTS} elements; registration runs the "
                             "model once on an input of this shape")


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
        VersionGone: ``spec.path`` was collected meanwhile (resolve the name again).
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
        if not Path(spec.path).is_dir():
            raise VersionGone(f"model {spec.name}: version {spec.path} was collected while loading") from exc
        raise ModelLoadError(f"model {spec.name} does not load: {type(exc).__name__}: {exc}") from exc
    if spec.format == "export":  # the export fixed the mode; its module refuses .eval()
        return module.requires_grad_(False)
    return module.eval().requires_grad_(False) if isinstance(module, nn.Module) else module


class _EmbeddingLookups(TorchDispatchMode):
    """Records, for each example input whose storage is the index of an embedding lookup
    (``aten.embedding``: ``nn.Embedding``, ``F.embedding``, an exported program's graph),
    the fewest rows of any table it indexes."""

    def __init__(self, storages: dict[int, int]):
        super().__init__()
        self.storages = storages
        self.rows: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.embedding.default and len(args) >= 2:
            weight, indices = args[0], args[1]
            i = self.storages.get(indices.untyped_storage().data_ptr())
            if i is not None:
                self.rows[i] = min(self.rows.get(i, weight.shape[0]), weight.shape[0])
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _embedding_limits(module: nn.Module, spec: ModelSpec, examples: tuple[torch.Tensor, ...]):
    """Sets ``high`` and ``max_len`` of ``spec``'s integer inputs (TensorSpec) from the forward
    pass run inside the block: an input whose storage is the index of an embedding lookup
    gets that table's row count; the dynamic last dimension of such an input gets the
    model's position limit (``max_position_embeddings`` or ``n_positions`` of a config; this
    assumes positions 0..T-1, as BERT and GPT-2 number them, not RoBERTa's offset ones)."""
    storages = {e.untyped_storage().data_ptr(): i for i, e in enumerate(examples) if not e.is_floating_point()}
    lookups = _EmbeddingLookups(storages)
    with lookups:
        yield
    positions = [getattr(m.config, key) for m in module.modules() if hasattr(m, "config")
                 for key in ("max_position_embeddings", "n_positions") if isinstance(getattr(m.config, key, None), int)]
    for i, high in lookups.rows.items():
        spec.inputs[i].high = high
        if positions and spec.inputs[i].shape and spec.inputs[i].shape[-1] is None:
            spec.inputs[i].max_len = min(positions)


def write_layout(folder: Path, spec: ModelSpec, module: nn.Module, layout: Layout) -> None:
    """Stores ``layout`` (the first-use order traced at registration) in ``folder`` as
    :data:`LAYOUT_FILE`, and in :data:`EXTRA_WEIGHTS_FILE` the weights of ``module`` that its
    safetensors file lacks (non-persistent buffers such as BERT's ``position_ids``), so that a
    GPU server can pack the model without building it on the CPU or tracing it again
    (store.load)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(folder / spec.weights), framework="pt") as f:
        stored = set(f.keys())
    weights = named_weights(module)
    extra = {s.names[0]: weights[s.names[0]].contiguous() for s in layout.slots if stored.isdisjoint(s.names)}
    if extra:
        save_file(extra, str(folder / EXTRA_WEIGHTS_FILE))
    (folder / LAYOUT_FILE).write_text(json.dumps(layout.to_json()))


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Repository:
    """A local model repository directory (``TORPOR_MODEL_REPO``), laid out as the module
    docstring says.

    Args:
        root: the directory; created when missing.
        grace_s: how long a superseded version is kept before :meth:`collect` deletes it, s.
            It must exceed the time a reader takes from resolving a name to opening its files
            (and the instant between a new version's rename into ``.versions`` and its link).
    """

    def __init__(self, root: Path | str, grace_s: float = VERSION_GRACE_S):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.grace_s = grace_s

    def folder(self, name: str) -> Path:
        """``root/NAME``, the name's symlink (or plain folder).

        Raises:
            ModelLoadError: ``name`` breaks a rule of protocol.check_model_name.
        """
        try:
            return self.root / check_model_name(name)
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from None

    def resolve(self, name: str) -> Path:
        """The folder of ``name``'s current version, resolved once: read every file of one
        registration from it, never through ``root/NAME`` again.

        Raises:
            KeyError: no such model.
            ModelLoadError: invalid name.
        """
        try:
            version = self.folder(name).resolve(strict=True)
        except (FileNotFoundError, NotADirectoryError):
            raise KeyError(name) from None
        if not (version / "model.json").exists():
            raise KeyError(name)
        return version

    def spec(self, name: str) -> ModelSpec:
        """The registered spec of ``name``; its ``path`` is the resolved version folder.

        Raises:
            KeyError: no such model.
            ModelLoadError: its description is broken.
        """
        version = self.resolve(name)
        try:
            return ModelSpec.read(version)
        except ModelLoadError:
            if version.is_dir():
                raise
        return ModelSpec.read(self.resolve(name))  # collected between resolving and reading: once more

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if not p.name.startswith(".") and (p / "model.json").exists())

    def register(self, spec: ModelSpec, weights_file: Path) -> ModelSpec:
        """Validates ``spec`` + ``weights_file`` (builds, loads strictly, runs the example
        inputs once) in a staging folder and only then publishes them as a new version of
        ``spec.name`` (atomic: module docstring). Nothing is left behind when validation
        fails, and the current version, if any, stays current.

        Returns:
            ``spec`` with ``digest``, ``bytes`` and ``path`` (the new version folder) set.

        Raises:
            ModelLoadError: invalid name, or the model does not build, load or run.
        """
        self.folder(spec.name)
        try:
            check_inputs(spec.inputs)
        except ValueError as exc:
            raise ModelLoadError(f"model {spec.name}: {exc}") from None
        stage = self.root / STAGING / f"{spec.name}-{uuid.uuid4().hex}"
        stage.mkdir(parents=True)
        try:
            shutil.copyfile(weights_file, stage / spec.weights)
            spec.path = str(stage)
            spec.digest = file_digest(stage / spec.weights)
            module = build(spec)
            examples = tuple(i.example() for i in spec.inputs)
            try:
                with _embedding_limits(module, spec, examples):
                    layout = trace_layout(module, examples)
            except Exception as exc:  # any failure of the forward pass means the inputs do not fit
                raise ModelLoadError(f"model {spec.name} does not run on its declared inputs: {type(exc).__name__}: {exc}") from exc
            spec.bytes = sum(slot.nbytes for slot in layout.slots)
            if spec.format == "safetensors":
                write_layout(stage, spec, module, layout)
            spec.write(stage)
            version = self.root / VERSIONS / stage.name
            version.parent.mkdir(exist_ok=True)
            stage.rename(version)
            spec.path = str(version)
            self._publish(spec.name, version)
        finally:
            shutil.rmtree(stage, ignore_errors=True)  # gone already unless validation failed
        self.collect()
        return spec

    def _publish(self, name: str, version: Path) -> None:
        """Makes ``version`` current for ``name`` with one rename of a new symlink over the old."""
        link = self.folder(name)
        new_link = self.root / STAGING / f"{uuid.uuid4().hex}.link"
        os.symlink(os.path.relpath(version, self.root), new_link)  # relative: the root may be mounted elsewhere
        try:
            previous = self._unpublish_folder(link)
            if previous is None and link.is_symlink():
                previous = link.resolve()
            os.replace(new_link, link)
        except BaseException:
            new_link.unlink(missing_ok=True)
            raise
        if previous is not None:
            _retire(previous)

    def _unpublish_folder(self, link: Path) -> Path | None:
        """Moves a plain folder at ``link`` (hand-made or from an older Torpor) into
        ``.versions``, so that a symlink can take its place; returns where it went, or None
        when ``link`` is no plain folder."""
        if link.is_symlink() or not link.is_dir():
            return None
        moved = self.root / VERSIONS / f"{link.name}-{uuid.uuid4().hex}"
        moved.parent.mkdir(exist_ok=True)
        # stamped before the move: a collect() between the move and the new link must see it
        # as just retired, not as an old unreferenced version
        os.utime(link)
        link.rename(moved)
        return moved

    def unregister(self, name: str) -> None:
        """Removes ``name`` atomically (its symlink is unlinked in one step); its version
        folder is collected after the grace period, so that a load running now finishes.

        Raises:
            KeyError: no such model.
            ModelLoadError: invalid name.
        """
        link = self.folder(name)
        previous = self._unpublish_folder(link)
        if previous is None:
            if not link.is_symlink():
                raise KeyError(name)
            previous = link.resolve()
            try:
                link.unlink()
            except FileNotFoundError:  # a concurrent unregister was first
                raise KeyError(name) from None
        _retire(previous)
        self.collect()

    def collect(self) -> list[Path]:
        """Deletes the version folders that no name points to and that stopped being current
        ``grace_s`` or more ago, and staging folders older than :data:`STAGING_MAX_AGE_S`
        (left by a crashed registration). Safe while other processes read and register
        (module docstring).

        Returns:
            the folders deleted.
        """
        current = {p.resolve() for p in self.root.iterdir() if not p.name.startswith(".") and p.is_symlink()}
        now = time.time()
        deleted = []
        for kind, max_age in ((VERSIONS, self.grace_s), (STAGING, STAGING_MAX_AGE_S)):
            try:
                entries = list((self.root / kind).iterdir())
            except FileNotFoundError:
                continue
            for entry in entries:
                try:
                    old = now - entry.lstat().st_mtime >= max_age
                except FileNotFoundError:  # collected by another process meanwhile
                    continue
                if old and entry.resolve() not in current:
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink(missing_ok=True)
                    deleted.append(entry)
        return deleted


def _retire(version: Path) -> None:
    """Stamps ``version`` with the time it stopped being current (its mtime), from which
    :meth:`Repository.collect` counts the grace period."""
    try:
        os.utime(version)
    except FileNotFoundError:
        pass


def parse_input(text: str) -> TensorSpec:
    """``name:dtype:d0xd1x...`` (``?`` for a dynamic dim) → TensorSpec."""
    try:
        name, dtype, dims = text.split(":")
        spec = TensorSpec(name, dtype, [None if d == "?" else int(d) for d in dims.split("x")])
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected name:dtype:d0xd1x... e.g. x:float32:1x3x224x224",
                                 param_hint="--input") from None
    if dtype not in DTYPES:
        raise click.BadParameter(f"{text!r}: unknown dtype {dtype!r} (one of {', '.join(DTYPES)})", param_hint="--input")
    if any(d is not None and d < 1 for d in spec.shape):
        raise click.BadParameter(f"{text!r}: dimensions must be positive (or ? for a dynamic one)", param_hint="--input")
    return spec


def parse_config(text: str) -> dict:
    """The ``--config`` JSON object.

    Raises:
        click.BadParameter: not JSON, or not an object.
    """
    try:
        config = json.loads(text)
    except ValueError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}", param_hint="--config") from None
    if not isinstance(config, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--config")
    return config


@dataclass
class RepositorySettings:
    """Where the model repository is and which GPU server to tell about new and removed models."""

    model_repo: str = setting(".state/models", "TORPOR_MODEL_REPO", "model repository directory")
    gpu_socket: str = setting("", "TORPOR_GPU_SOCKET",
                              "GPU server socket to load a new model into, or to drop a removed one from (empty: none)")
    redis_url: str = setting("", "TORPOR_REDIS_URL", "Redis to record the model in (empty: none)")


@click.group("model")
def command() -> None:
    """Register, list and remove models of the repository."""


@command.command("register")
@click.argument("name")
@click.option("--architecture", help="architecture from the zoo (not for --format export)")
@click.option("--config", "config_json", default="{}", help="architecture config as JSON")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), required=True,
              help="weights file (safetensors, a torch.save state dict, or a torch.export archive)")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="safetensors", help="what --weights holds")
@click.option("--input", "inputs", multiple=True, required=True, help="name:dtype:d0xd1x... (repeatable)")
@options(RepositorySettings)
def register_command(name, architecture, config_json, weights, fmt, inputs, **kwargs) -> None:
    """Validate a model and add it to the repository as NAME."""
    settings = from_kwargs(RepositorySettings, kwargs)
    specs = [parse_input(i) for i in inputs]
    try:
        check_inputs(specs)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--input") from None
    spec = ModelSpec(name=name, inputs=specs, format=fmt, architecture=architecture,
                     config=parse_config(config_json),
                     weights=Path(weights).name if fmt != "safetensors" else "model.safetensors")
    try:
        spec = Repository(settings.model_repo).register(spec, Path(weights))
    except ModelLoadError as exc:
        raise click.ClickException(str(exc)) from exc
    announce(spec, settings)
    click.echo(json.dumps({"name": spec.name, "bytes": spec.bytes, "digest": spec.digest}))


def announce(spec: ModelSpec, settings: RepositorySettings) -> None:
    """Records ``spec`` in Redis and asks the GPU server to load it, where configured.

    Raises:
        click.ClickException: Redis or the GPU server failed; the message says the model is
            registered in the repository all the same (GPU servers find it there by themselves).
    """
    import redis

    from runtime.client import GPUServerClient, ModelError

    registered = f"model {spec.name} is registered in {settings.model_repo}, but "
    try:
        if settings.redis_url:
            redis.Redis.from_url(settings.redis_url).hset("torpor:models", spec.name, json.dumps(
                {"name": spec.name, "path": str(Path(settings.model_repo) / spec.name), "architecture": spec.architecture,
                 "bytes": spec.bytes, "digest": spec.digest, "inputs": [asdict(i) for i in spec.inputs]}))
    except redis.RedisError as exc:
        raise click.ClickException(f"{registered}recording it in Redis ({settings.redis_url}) failed: {exc}") from None
    try:
        if settings.gpu_socket:
            GPUServerClient(settings.gpu_socket).register(spec.name)
    except ModelError as exc:
        hint = " (set TORPOR_NODE_SECRET to the node's secret)" if exc.status == 403 else ""
        raise click.ClickException(f"{registered}the GPU server at {settings.gpu_socket} did not load it: "
                                   f"{exc}{hint}") from None


@command.command("list")
@options(RepositorySettings)
def list_command(**kwargs) -> None:
    """List the models of the repository."""
    settings = from_kwargs(RepositorySettings, kwargs)
    repo = Repository(settings.model_repo)
    for name in repo.names():
        spec = repo.spec(name)
        click.echo(f"{name}\t{spec.format}\t{spec.architecture or '-'}\t{spec.bytes}")


@command.command("unregister")
@click.argument("name")
@options(RepositorySettings)
def unregister_command(name, **kwargs) -> None:
    """Remove NAME from the repository, from Redis and from the GPU server's memory, where
    configured. Its files are deleted by a later register or unregister, after the grace
    period (a load running now finishes)."""
    settings = from_kwargs(RepositorySettings, kwargs)
    try:
        Repository(settings.model_repo).unregister(name)
    except KeyError:
        raise click.ClickException(f"no model {name!r} in {settings.model_repo}") from None
    except ModelLoadError as exc:
        raise click.ClickException(str(exc)) from exc
    if settings.redis_url:
        import redis
        redis.Redis.from_url(settings.redis_url).hdel("torpor:models", name)
    if settings.gpu_socket:
        from runtime.client import GPUServerClient
        GPUServerClient(settings.gpu_socket).unregister(name)
    click.echo(json.dumps({"name": name, "unregistered": True}))
