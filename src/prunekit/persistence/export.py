"""Export to ONNX and check the exported graph against PyTorch with ONNX Runtime (optional extra ``onnx``)."""

from __future__ import annotations

import io
import logging
import warnings
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


def _require(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise ImportError(f"ONNX export needs the optional extra: pip install 'prunekit[onnx]' (missing {module})"
                          ) from None


def export_onnx(model: nn.Module, path: str | Path, input_shape: tuple[int, ...], opset: int = 18) -> Path:
    """Write ``model`` (eval mode) as ONNX with a dynamic batch dimension.

    Args:
        input_shape: One example's shape (C, H, W), without the batch dimension.
    """
    _require("onnx")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    x = torch.randn(2, *input_shape)
    batch = torch.export.Dim("batch", min=1, max=4096)
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)  # silences "torchvision is not installed" notes of the exporter
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), input_names=["input"], output_names=["logits"],
                          dynamic_shapes=({0: batch},), opset_version=opset, dynamo=True, external_data=False)
    onnx_logger.setLevel(level)
    model.train(was_training)
    return path


class _KeywordCall(nn.Module):
    """Positional tensors in, ``model(**keywords)`` inside, the output's tensors out (what ONNX export traces)."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from prunekit.channels.model_io import output_tensors

        return tuple(output_tensors(self.model(**dict(zip(self.names, tensors)))))


def export_onnx_keywords(model: nn.Module, path: str | Path, example_inputs: dict[str, torch.Tensor],
                         opset: int = 18) -> Path:
    """Write a model that takes keyword tensors (a Hugging Face model: ``input_ids``, ``attention_mask``,
    ``pixel_values``) as ONNX, one graph input per keyword and one graph output per output tensor (named by its
    path: ``last_hidden_state``, ``logits``). The batch dimension is dynamic, and so is the sequence dimension of
    2-D integer inputs (token ids and masks)."""
    _require("onnx")
    from prunekit.channels.model_io import output_leaves

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(example_inputs)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        outputs = [p.strip(".").replace(".", "_").replace("[", "_").replace("]", "") or "output"
                   for p, _ in output_leaves(model(**example_inputs))]
    batch = torch.export.Dim("batch", min=1, max=4096)
    lengths: dict[int, Any] = {}  # one dynamic length per distinct example length (ids and their mask share it)
    dynamic = []
    for name, t in example_inputs.items():
        axes: dict[int, Any] = {0: batch}
        if t.dim() == 2 and not t.is_floating_point():
            if t.shape[1] < 2:
                raise ValueError(f"example input {name!r} has sequence length {t.shape[1]}; export needs an example "
                                 "of at least 2 tokens to keep the length dynamic")
            length = int(t.shape[1])
            if length not in lengths:
                lengths[length] = torch.export.Dim(f"length{len(lengths)}", min=2, max=8192)
            axes[1] = lengths[length]
        dynamic.append(axes)
    dynamic = tuple(dynamic)
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(_KeywordCall(model, names), tuple(example_inputs.values()), str(path),
                              input_names=names, output_names=outputs, dynamic_shapes=(dynamic,), opset_version=opset,
                              dynamo=True, external_data=False)
    finally:
        onnx_logger.setLevel(level)
        model.train(was_training)
    return path


def check_onnx_keywords(model: nn.Module, path: str | Path, inputs: dict[str, torch.Tensor]) -> float:
    """Max abs difference, over every output, between PyTorch and ONNX Runtime on keyword ``inputs``."""
    from prunekit.channels.model_io import output_tensors

    session = onnx_session(path)
    with torch.no_grad():
        expected = [t.numpy() for t in output_tensors(model.eval()(**inputs))]
    got = session.run(None, {k: v.numpy() for k, v in inputs.items()})
    return max(float(np.abs(g - e).max()) for g, e in zip(got, expected, strict=True))


def onnx_session(path: str | Path, threads: int | None = None, optimize: bool = True):
    """An ONNX Runtime CPU session with graph optimisations (all levels) on."""
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_onnx(model: nn.Module, path: str | Path, input_shape: tuple[int, ...], batch: int = 4) -> float:
    """Max abs difference between PyTorch and ONNX Runtime outputs on a random batch."""
    session = onnx_session(path)
    x = torch.randn(batch, *input_shape)
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    got = session.run(None, {"input": x.numpy()})[0]
    return float(np.abs(got - expected).max())
