"""Calling a model on example inputs of any form, and comparing outputs of any nesting.

Example inputs are a tensor (``model(x)``), a tuple or list of positional arguments (``model(*args)``) or a dict
of keyword arguments (``model(**kwargs)``, what Hugging Face models take: ``input_ids``, ``attention_mask``).
Outputs may be a tensor or any nesting of tuples, lists, dicts and dataclasses (Hugging Face's output classes are
both); they are compared leaf by leaf, so the shrink-equals-mask check holds for every output a model returns.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

ExampleInputs = torch.Tensor | tuple | list | Mapping


def check_example_inputs(inputs: Any) -> None:
    """Raise a ``TypeError`` naming what was given unless ``inputs`` is a tensor, a tuple/list or a dict with
    string keys."""
    if isinstance(inputs, torch.Tensor):
        return
    if isinstance(inputs, (tuple, list)) and inputs:
        return
    if isinstance(inputs, Mapping) and inputs and all(isinstance(k, str) for k in inputs):
        return
    raise TypeError(f"example inputs must be a tensor, a non-empty tuple/list of positional arguments or a non-empty "
                    f"dict of keyword arguments (str keys), got {type(inputs).__name__}"
                    + (" (empty)" if isinstance(inputs, (tuple, list, Mapping)) else ""))


def call_model(model: nn.Module, inputs: ExampleInputs) -> Any:
    """``model(x)``, ``model(*inputs)`` or ``model(**inputs)`` for a tensor, a tuple/list or a dict."""
    check_example_inputs(inputs)
    if isinstance(inputs, torch.Tensor):
        return model(inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(*inputs)


def to_device(inputs: Any, device: torch.device | str) -> Any:
    """``inputs`` (a tensor, or tuples, lists and dicts of them) with every tensor moved to ``device``."""
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return {k: to_device(v, device) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(to_device(v, device) for v in inputs)
    return inputs


def first_examples(inputs: Any, n: int = 1) -> Any:
    """The first ``n`` examples of ``inputs``: every tensor (in tuples, lists and dicts) cut along its batch
    dimension."""
    if isinstance(inputs, torch.Tensor):
        return inputs[:n]
    if isinstance(inputs, Mapping):
        return {k: first_examples(v, n) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(first_examples(v, n) for v in inputs)
    return inputs


def output_leaves(output: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in ``output`` with its path (``[0].logits``), depth first, in a fixed order; values that are
    not tensors (None, ints, strings) are left out."""
    if isinstance(output, torch.Tensor):
        yield path or "output", output
    elif isinstance(output, Mapping):
        for key, value in output.items():
            yield from output_leaves(value, f"{path}.{key}")
    elif dataclasses.is_dataclass(output) and not isinstance(output, type):
        for field in dataclasses.fields(output):
            yield from output_leaves(getattr(output, field.name), f"{path}.{field.name}")
    elif isinstance(output, (tuple, list)):
        for i, value in enumerate(output):
            yield from output_leaves(value, f"{path}[{i}]")


def output_tensors(output: Any) -> list[torch.Tensor]:
    """The tensors of :func:`output_leaves`, without their paths."""
    return [t for _, t in output_leaves(output)]


def output_difference(got: Any, reference: Any) -> tuple[float, float]:
    """Largest absolute difference between two outputs leaf by leaf, and the largest magnitude of ``reference``'s
    floating-point leaves.

    A leaf that is missing, extra or of another shape makes the difference infinite (the outputs are not the same
    function of the inputs); so does an integer or boolean leaf that differs at all. NaN in the same places of both
    counts as equal."""
    a, b = dict(output_leaves(got)), dict(output_leaves(reference))
    floats = [t for t in b.values() if t.numel() and (t.is_floating_point() or t.is_complex())]
    scale = max((float(t.detach().abs().nan_to_num(0.0, 0.0, 0.0).max()) for t in floats), default=0.0)
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in b):
        return math.inf, scale
    diff = 0.0
    for k, ref in b.items():
        if not ref.numel():
            continue
        mine = a[k].detach()
        if not (ref.is_floating_point() or ref.is_complex()):
            if not torch.equal(mine, ref.detach()):
                return math.inf, scale
            continue
        delta = (mine.double() - ref.detach().double()).abs()
        both_nan = torch.isnan(mine) & torch.isnan(ref.detach())
        delta = torch.where(both_nan, torch.zeros_like(delta), delta)
        if torch.isnan(delta).any():  # NaN on one side only
            return math.inf, scale
        diff = max(diff, float(delta.max()))
    return diff, scale


def outputs_match(got: Any, reference: Any, atol: float) -> tuple[bool, float]:
    """Whether ``got`` equals ``reference`` to ``atol`` (relative to the output scale when it exceeds 1), and the
    difference."""
    diff, scale = output_difference(got, reference)
    return diff <= atol * max(1.0, scale), diff
