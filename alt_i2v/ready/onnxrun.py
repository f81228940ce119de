"""ONNX networks on onnxruntime: batched, on CUDA when ``onnxruntime-gpu`` provides it, else on the CPU.

The graph is read once with ``onnx`` to find what alt-i2v needs besides the probabilities: the input size
(an NHWC image input), and the embedding, which is the input of the tag head. The head is found by
walking back from the output through the sigmoid, a bias ``Add`` and reshapes to the ``MatMul``/``Gemm``
(or 1x1 ``Conv`` before a global pool) that makes one logit per tag; its other input becomes a second
output of the session, so one run gives both. Both packages come with the ``wd14`` extra.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import AltI2VError

EXTRA = "wd14"
PASS_THROUGH = {"Sigmoid", "Identity", "Cast", "Reshape", "Flatten", "Squeeze", "GlobalAveragePool",
                "ReduceMean", "Transpose"}
PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


def require_onnxruntime() -> Any:
    """The onnxruntime module, or an error naming the extra that installs it."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError as e:
        raise AltI2VError(f"ONNX models (WD14 taggers) need onnx and onnxruntime ({e.name} is not installed): "
                          f"pip install 'alt-i2v[{EXTRA}]' (for NVIDIA GPUs add onnxruntime-gpu)") from None
    return onnxruntime


def providers() -> list[str]:
    """The execution providers to ask for, best first: CUDA when this onnxruntime has it, then the CPU."""
    ort = require_onnxruntime()
    available = set(ort.get_available_providers())
    return [p for p in PROVIDERS if p in available] or ["CPUExecutionProvider"]


def load_onnx(path: str | os.PathLike) -> Any:
    """The ModelProto of ``path``, or an error saying why it cannot be read."""
    require_onnxruntime()
    import onnx

    try:
        return onnx.load(str(path))
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: protobuf raises many kinds
        raise AltI2VError(f"{path}: cannot read the ONNX model ({type(e).__name__}: {e}); download "
                          "model.onnx again") from None


def _initializers(graph: Any) -> set[str]:
    names = {i.name for i in graph.initializer}
    names |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    return names


def _image_input(proto: Any, where: Any) -> Any:
    inits = _initializers(proto.graph)
    inputs = [i for i in proto.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise AltI2VError(f"{where}: the graph has {len(inputs)} inputs; a tagger takes one image batch")
    return inputs[0]


def input_geometry(proto: Any, where: Any) -> tuple[int, int | None]:
    """``(size, fixed batch or None)`` of the NHWC image input (N, S, S, 3) of the graph."""
    inp = _image_input(proto, where)
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
    if len(dims) != 4 or dims[3] != 3 or not dims[1] or dims[1] != dims[2]:
        raise AltI2VError(f"{where}: input {inp.name!r} has shape {dims}; a WD14 tagger takes NHWC images "
                          "(batch, size, size, 3) with the size written in the graph")
    return int(dims[1]), (int(dims[0]) if dims[0] and dims[0] > 0 else None)


def find_head(graph: Any, where: Any = "model.onnx") -> tuple[str, str, str]:
    """``(probability output, embedding tensor, head op)``: the tensor that enters the tag head, found by
    walking back from the first output through pass-through ops and a bias Add."""
    producer = {out: node for node in graph.node for out in node.output}
    inits = _initializers(graph)
    out = graph.output[0].name
    name, seen = out, 0
    while seen < 64:
        seen += 1
        node = producer.get(name)
        if node is None:
            break
        if node.op_type in PASS_THROUGH:
            name = node.input[0]
        elif node.op_type == "Add":
            data = [i for i in node.input if i not in inits]
            if len(data) != 1:
                break
            name = data[0]
        elif node.op_type in ("MatMul", "Gemm", "Conv"):
            data = [i for i in node.input if i not in inits]
            if not data:
                break
            return out, data[0], node.op_type
        else:
            break
    raise AltI2VError(f"{where}: cannot find the tag head (a MatMul, Gemm or 1x1 Conv before the output's "
                      "sigmoid), so no embedding layer; tagging works, --embed/--index/--similar do not")


class OnnxRunner:
    """One onnxruntime session over a tagger graph: ``run(uint8 batch) -> (probabilities, embeddings)``.

    ``prepare`` turns loaded uint8 RGB squares into the network's input (the family's convention). A graph
    whose batch size is fixed (some converted models say 1) is fed that many images at a time."""

    def __init__(self, path: str | os.PathLike, num_tags: int, prepare: Callable[[np.ndarray], np.ndarray], *,
                 proto: Any = None, threads: int | None = None, provider_list: list[str] | None = None):
        ort = require_onnxruntime()
        import onnx
        from onnx import helper

        self.path = Path(path)
        proto = proto if proto is not None else load_onnx(path)
        self.prepare = prepare
        self.input_name = _image_input(proto, path).name
        self.image_size, self.fixed_batch = input_geometry(proto, path)
        self.output_name = proto.graph.output[0].name
        try:
            _, self.embedding_name, self.head_op = find_head(proto.graph, path)
        except AltI2VError as e:
            self.embedding_name, self.head_op, self.head_error = None, None, e
        names = [self.output_name]
        if self.embedding_name:
            if self.embedding_name not in {o.name for o in proto.graph.output}:
                proto.graph.output.append(helper.make_tensor_value_info(self.embedding_name,
                                                                        onnx.TensorProto.FLOAT, None))
            names.append(self.embedding_name)
        self.output_names = names
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        self.providers = provider_list or providers()
        try:
            self.session = ort.InferenceSession(proto.SerializeToString(), options, providers=self.providers)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own kinds for bad graphs
            raise AltI2VError(f"{path}: onnxruntime cannot load the model ({type(e).__name__}: {e})") from None
        self.num_tags = int(num_tags)
        self._dim: int | None = None
        shape = self.session.get_outputs()[0].shape
        if shape and isinstance(shape[-1], int) and shape[-1] != self.num_tags:
            raise AltI2VError(f"{path}: the network gives {shape[-1]} outputs per image but the tag list has "
                              f"{self.num_tags} tags; model.onnx and selected_tags.csv come from different models")

    @property
    def embedding_dim(self) -> int:
        if self._dim is None:
            self.require_embedding()
            _, emb = self.run(np.zeros((1, self.image_size, self.image_size, 3), np.uint8))
            self._dim = int(emb.shape[1])
        return self._dim

    def require_embedding(self) -> None:
        if not self.embedding_name:
            raise self.head_error

    def _pool(self, emb: np.ndarray) -> np.ndarray:
        if emb.ndim == 4:  # the input of a 1x1 Conv head: NCHW, averaged over positions
            return emb.mean(axis=(2, 3))
        if emb.ndim == 3:
            return emb.mean(axis=1)
        return emb.reshape(len(emb), -1)

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities (N, T) float32 and embeddings (N, D) float32 (not normalised; None without a
        head) of loaded uint8 images (N, S, S, 3)."""
        x = self.prepare(batch)
        step = self.fixed_batch or len(x)
        probs, embs = [], []
        for s in range(0, len(x), max(1, step)):
            part = x[s:s + step]
            n = len(part)
            if self.fixed_batch and n < step:
                part = np.concatenate([part, np.zeros((step - n,) + part.shape[1:], part.dtype)])
            outs = self.session.run(self.output_names, {self.input_name: part})
            probs.append(np.asarray(outs[0], np.float32).reshape(len(part), -1)[:n])
            if len(outs) > 1:
                embs.append(self._pool(np.asarray(outs[1], np.float32))[:n])
        p = np.concatenate(probs) if probs else np.empty((0, self.num_tags), np.float32)
        if p.shape[1] != self.num_tags:
            raise AltI2VError(f"{self.path}: the network gave {p.shape[1]} outputs per image, the tag list "
                              f"has {self.num_tags}; model.onnx and selected_tags.csv come from different models")
        return p, (np.concatenate(embs) if embs else None)


__all__ = ["OnnxRunner", "require_onnxruntime", "providers", "load_onnx", "input_geometry", "find_head", "EXTRA"]
