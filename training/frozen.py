"""An exported generator file as a frozen, differentiable torch module: gradients through G for training an encoder
against the file the server serves, when no checkpoint is at hand (the shipped model has none).

It runs the file's own graph, node by node, with torch operators, for the operators training.export writes (listed in
OPS); an operator it does not know is refused by name, and the result is checked against ONNX Runtime on load.
onnx2torch, the maintained converter, does the same for most of ONNX, but it imports torchvision, whose wheel brings
its own CUDA build of torch over the pinned CPU one, and it does not read Reshape's `allowzero`, which the exporter
writes; twenty operators are cheaper than that.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from service.contract import ModelSpec, read_spec, seed_latents

PARITY_ATOL = 1e-4


class FrozenError(Exception):
    """A file this module cannot run, or runs differently from ONNX Runtime; the message says which node."""


def _gemm(a, b, c=None, alpha=1.0, beta=1.0, transA=0, transB=0):
    out = alpha * ((a.T if transA else a) @ (b.T if transB else b))
    return out if c is None else out + beta * c


def _batchnorm(x, scale, bias, mean, var, epsilon=1e-5, **_):
    return F.batch_norm(x, mean, var, scale, bias, training=False, eps=epsilon)


def _conv(transposed: bool):
    def run(x, w, b=None, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), group=1, output_padding=(0, 0), **_):
        if pads[: len(pads) // 2] != pads[len(pads) // 2 :]:
            raise FrozenError("asymmetric padding")
        pad = tuple(pads[: len(pads) // 2])
        if transposed:
            return F.conv_transpose2d(x, w, b, strides, pad, tuple(output_padding), group, dilations)
        return F.conv2d(x, w, b, strides, pad, dilations, group)

    return run


def _reshape(x, shape, allowzero=0):
    shape = [int(s) for s in shape]
    if not allowzero:
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _unsqueeze(x, axes):
    for axis in sorted(int(a) % (x.dim() + len(axes)) for a in axes):
        x = x.unsqueeze(axis)
    return x


def _clip(x, lo=None, hi=None):
    return torch.clamp(x, None if lo is None else float(lo), None if hi is None else float(hi))


OPS = {
    "Gemm": _gemm,
    "MatMul": lambda a, b: a @ b,
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div,
    "Relu": lambda x: F.relu(x), "Tanh": torch.tanh, "Sigmoid": torch.sigmoid,
    "LeakyRelu": lambda x, alpha=0.01: F.leaky_relu(x, alpha),
    "Clip": _clip, "Reshape": _reshape, "Unsqueeze": _unsqueeze, "Identity": lambda x: x,
    "Concat": lambda *xs, axis: torch.cat(xs, axis), "Cast": lambda x, to: x if x.is_floating_point() else x.float(),
    "BatchNormalization": _batchnorm, "ConvTranspose": _conv(True), "Conv": _conv(False),
}  # fmt: skip


class FrozenGenerator(torch.nn.Module):
    """G(z[, y]) → images, the file's own graph in torch, weights frozen; `spec` is the file's contract."""

    def __init__(self, path: Path):
        super().__init__()
        model = onnx.load(str(path))
        self.spec: ModelSpec = read_spec(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]))
        # Float16 weights (an --fp16 export) run in float32: the file's arithmetic to within its parity_atol.
        self.constants = {i.name: _tensor(i) for i in model.graph.initializer}
        self.nodes = []
        for node in model.graph.node:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if node.op_type == "Constant":
                self.constants[node.output[0]] = _tensor(attrs["value"])
                continue
            if node.op_type not in OPS:
                raise FrozenError(
                    f"{path}: node {node.name or node.output[0]!r}: operator {node.op_type} not supported"
                )
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items() if k != "auto_pad"}
            self.nodes.append((node.op_type, list(node.input), list(node.output), attrs))
        for t in self.constants.values():
            t.requires_grad_(False)
        self._check(path)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        values = dict(self.constants) | {"z": z} | ({"y": y} if y is not None else {})
        for op, inputs, outputs, attrs in self.nodes:
            args = [values[name] if name else None for name in inputs]
            if op in ("Reshape", "Unsqueeze"):  # shapes and axes are data in ONNX, arguments in torch
                args[1] = args[1].tolist()
            if op == "Clip":
                args[1:] = [None if a is None else a.item() for a in args[1:]]
            if op == "BatchNormalization":
                attrs = {k: v for k, v in attrs.items() if k != "momentum"}
            values[outputs[0]] = OPS[op](*args, **attrs)
        return values["images"]

    def _check(self, path: Path) -> None:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        spec = self.spec
        z = seed_latents(range(7), spec.latent_dim, spec.prior)
        feeds = {"z": z}
        if spec.num_classes:
            feeds["y"] = np.eye(spec.num_classes, dtype=np.float32)[np.arange(7) % spec.num_classes]
        want = session.run(["images"], feeds)[0]
        with torch.no_grad():
            got = self(*(torch.from_numpy(v) for v in feeds.values())).numpy()
        worst, atol = (
            float(np.abs(got - want).max()),
            max(PARITY_ATOL, 2 * float(spec.provenance.get("parity_atol", 0))),
        )
        if worst > atol:
            raise FrozenError(f"{path}: runs {worst:.3g} away from ONNX Runtime (more than {atol:g})")


def _tensor(proto: onnx.TensorProto) -> torch.Tensor:
    array = numpy_helper.to_array(proto)
    return torch.from_numpy(array.astype(np.float32) if array.dtype == np.float16 else array.copy())
