"""Bring your own model: a function builds its model in its own code and hands it to the
node's GPU server once, at ``/init``::

    import numpy as np
    import torch
    from runtime.remote import remote

    net = remote(MyNet().eval(), (torch.zeros(1, 3, 32, 32),))   # at import, i.e. at /init

    def main(args):
        logits = net(np.asarray(args["x"], dtype=np.float32))     # numpy in, numpy out
        return {"logits": logits.tolist()}

``remote`` exports the module with ``torch.export`` (static shapes: those of the example
inputs), saves the program, and registers it with the GPU server (``register_program``, see
docs/gpu-server-protocol.md) under a name made of the action's name and the program's digest.
A later container of the same action exports the same program again, finds it registered
and uploads nothing. Every call then goes to the GPU server like ``Model(name)(x)``.

Importing this module imports torch: only actions that use it pay for that, at ``/init``.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

from runtime.client import GPUServerClient

# dtypes that travel over the GPU server protocol (NumPy has no bfloat16)
SERVED_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.int64: "int64",
                 torch.int32: "int32", torch.uint8: "uint8", torch.bool: "bool"}
DIGEST_CHARS = 16  # hex digits of the program's SHA-256 that end its model name
MAX_SCOPE_CHARS = 150


class RemoteModel:
    """A module that runs on the node's GPU server.

    Call it with numpy arrays or CPU tensors of the example inputs' shapes and dtypes; it
    returns numpy arrays in the structure the module returns (one array, a tuple, a dict...).

    Attributes:
        name: the registered model name.
        created: whether this registration wrote the model on the server (False when a
            container of the same action had registered it before).
        uploaded: whether this process sent the program's bytes.

    Raises (on call):
        runtime.client.ModelError: see its ``status`` (400 for inputs of other shapes or dtypes).
    """

    def __init__(self, name: str, client: GPUServerClient, outputs: TreeSpec, created: bool, uploaded: bool):
        self.name = name
        self.client = client
        self._outputs = outputs
        self.created = created
        self.uploaded = uploaded

    def __call__(self, *inputs) -> Any:
        return tree_unflatten(self.client.infer(self.name, list(inputs)), self._outputs)

    def __repr__(self) -> str:
        return f"RemoteModel({self.name!r})"


class UnservableOutput(TypeError):
    """The module returns something the GPU server cannot send back (not a tensor, or a dtype
    NumPy lacks)."""


class _FlatOutputs(nn.Module):
    """The user's module with its outputs flattened to a tuple of tensors, as the GPU server
    returns them; the export's trace appends their structure to ``structures`` (a list:
    export restores the module's attributes after tracing), which :class:`RemoteModel` puts
    back."""

    def __init__(self, inner: nn.Module, structures: list[TreeSpec]):
        super().__init__()
        self.inner = inner
        self.structures = structures

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        leaves, structure = tree_flatten(self.inner(*inputs))
        for i, t in enumerate(leaves):
            if not isinstance(t, torch.Tensor) or t.dtype not in SERVED_DTYPES:
                raise UnservableOutput(f"remote(): output {i} of {type(self.inner).__name__} is "
                                       f"{getattr(t, 'dtype', type(t).__name__)}; the GPU server returns tensors of "
                                       f"{', '.join(SERVED_DTYPES.values())}")
        self.structures.append(structure)
        return tuple(leaves)


def remote(module: nn.Module, example_inputs, name: str | None = None,
           client: GPUServerClient | None = None) -> RemoteModel:
    """Exports ``module`` with ``torch.export``, registers it with the node's GPU server, and
    returns a callable that runs it there.

    Args:
        module: the model, on the CPU, in the mode to serve (``.eval()`` for inference).
        example_inputs: a CPU tensor or a tuple/list of them: the shapes and dtypes (float32,
            float16, int64, int32, uint8, bool) every call will have.
        name: label for the model name (default: the module's class name); the name is
            ``{namespace}.{action}.{label}-{16 hex digits of the program's SHA-256}``, the
            action from ``__OW_ACTION_NAME`` and ``__OW_NAMESPACE``.
        client: GPU server connection (default: ``$TORPOR_GPU_SOCKET``).

    Returns:
        A :class:`RemoteModel`.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``; an example input is not a tensor.
        ValueError: an example input is not on the CPU or has a dtype the protocol cannot carry.
        UnservableOutput: (a TypeError) an output is not a tensor or has such a dtype.
        RuntimeError: ``torch.export`` cannot export the module: "remote(): cannot export
            <Class>: <torch's reason>, at <file, line, code>" (e.g. Python control flow
            on tensor values).
        runtime.client.ModelError: the GPU server refused or could not load the program
            (status 400, 409, 413, 502) or is unreachable (503).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"remote() takes a torch.nn.Module, not {type(module).__name__}")
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    for i, t in enumerate(inputs):
        _check_input(t, i)
    structures: list[TreeSpec] = []
    try:
        program = torch.export.export(_FlatOutputs(module, structures), inputs, strict=False)
    except UnservableOutput:
        raise
    except Exception as exc:  # torch raises many types; each one means "cannot be exported"
        raise RuntimeError(f"remote(): cannot export {type(module).__name__}: {export_failure(exc)}") from exc
    for node in program.graph.nodes:
        # file paths differ between containers; without them every export of the module
        # is the same bytes, so later containers find their program registered
        node.meta.pop("stack_trace", None)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    model = f"{action_scope()}.{_clean(name or type(module).__name__)}-{digest[:DIGEST_CHARS]}"
    described = [{"name": n, "dtype": SERVED_DTYPES[t.dtype], "shape": list(t.shape)}
                 for n, t in zip(program.graph_signature.user_inputs, inputs)]
    client = client or GPUServerClient()
    reply, uploaded = client.register_program(model, digest, described, data)
    return RemoteModel(model, client, structures[-1], bool(reply.get("created")), uploaded)


def _check_input(t, index: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"remote(): example input {index} is a {type(t).__name__}, not a tensor")
    if t.device.type != "cpu":
        raise ValueError(f"remote(): example input {index} is on {t.device}; give CPU tensors")
    if t.dtype not in SERVED_DTYPES:
        raise ValueError(f"remote(): example input {index} is {t.dtype}; the GPU server takes "
                         f"{', '.join(SERVED_DTYPES.values())}")


def export_failure(exc: BaseException) -> str:
    """torch.export's reason in one line: its first line and, when torch names it, the user
    code that raised (file, line, source)."""
    lines = str(exc).splitlines()
    first = next((line.strip() for line in lines if line.strip()), "")
    reason = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    for i, line in enumerate(lines):
        if line.strip().startswith("The following call raised this error:"):
            frame = [x.strip() for x in lines[i + 1:i + 3] if x.strip()]
            if frame:
                reason += ", at " + ": ".join(frame)
            break
    return reason


def action_scope() -> str:
    """``namespace.action`` (package included) of the running action, from ``__OW_ACTION_NAME``
    (``/ns/[pkg/]action`` or a bare name) and ``__OW_NAMESPACE``; ``local`` outside one."""
    action = os.environ.get("__OW_ACTION_NAME", "")
    parts = action.split("/") if action.startswith("/") else [os.environ.get("__OW_NAMESPACE", ""), action]
    scope = ".".join(_clean(p) for p in parts if p)
    return scope[:MAX_SCOPE_CHARS] or "local"


def _clean(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)
