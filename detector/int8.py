"""int8 scoring on the CPU whose scores do not depend on the batch (issue 29).

Static quantisation: every input a quantised layer sees is rounded to 8 bits with one fixed
scale, set from the largest value that layer saw on normal images at calibration
(`activation_ranges`, stored in the bundle with the int8 check: trainer.calibrate.
validate_precisions). An image's int8 score is then a function of that image alone, as its fp32
score is, wherever the stream cut its batch. (torch's dynamic quantisation, which issue 21 used,
takes one scale per batch: an image's score moved with its batch-mates.)

Which layers: the networks' big GEMMs and convolutions, those that cost the time (BENCHMARKS.md,
"CPU scoring precision"): the MLP's Linear layers that read the image or a hidden layer, the
conv encoder's hidden convolution. The small layers stay in fp32: the latent heads (fc_mu,
fc_logvar, the transform head), the decoder's first Linear (it reads z), the conv encoder's first
convolution (one input channel: int8 is no faster there) and the conv decoder: oneDNN's quantised
transposed convolution gave wrong results here (off by the whole output on a 64 -> 32 layer),
fbgemm's took 2x the fp32 time, and the last layer's output, the logits, must not be rounded to
8 bits.

Weights in 7 bits, one scale per output channel: on a CPU without VNNI (AVX2) the int8 kernels
add pairs of u8 x s8 products in 16 bits, which full 8-bit weights can overflow (fbgemm's results
differed from exact integer arithmetic by 0.1 on a 784 x 400 layer here); with 7 bits they
cannot, so the integer part is exact on every x86 CPU.

Kernels: fbgemm's Linear that takes and returns float (quantising its input with the stored
scale inside the kernel), oneDNN's quantised convolutions (the faster of fbgemm, oneDNN and
torch's `x86` mix here). These are torch's own quantised kernels behind `torch.ao.nn.quantized`
(an API deprecated in favour of torchao, which was not tried). Per-row dynamic quantisation,
the other batch-independent form, needs an int8 matrix product with a scale per row: torch's
`torch._int_mm` measured 30-100x slower than fp32 on this CPU, and fbgemm's dynamic Linear takes
one scale per batch.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from detector.model import VAE

INPUT_LEVELS = 255  # quint8: post-ReLU activations and pixels are >= 0, zero point 0
WEIGHT_LEVELS = 63  # 7-bit weights: no 16-bit overflow in AVX2's u8 x s8 pair sums


class Int8RangesError(ValueError):
    """A model's int8 copy cannot be made from these activation ranges. One line."""


def _quantised(model: VAE) -> dict[str, tuple[nn.Module, bool]]:
    """name -> (layer, whether a ReLU follows it) of the layers the int8 copy quantises."""
    found: dict[str, tuple[nn.Module, bool]] = {}
    for body_name in ("encoder", "decoder"):
        body = getattr(model, body_name)
        if not isinstance(body, nn.Sequential):
            continue
        layers = list(body)
        for i, layer in enumerate(layers):
            relu = i + 1 < len(layers) and isinstance(layers[i + 1], nn.ReLU)
            big_linear = type(layer) is nn.Linear and layer.in_features > model.config.latent_dim
            hidden_conv = type(layer) is nn.Conv2d and layer.in_channels > 1 and relu
            if big_linear or hidden_conv:
                found[f"{body_name}.{i}"] = (layer, relu)
    return found


def quantised_layer_names(model: VAE) -> list[str]:
    return list(_quantised(model))


@torch.inference_mode()
def activation_ranges(model: VAE, images: torch.Tensor, *, batch_size: int = 1024) -> dict:
    """{layer name: [largest input, largest output]} of each layer the int8 copy quantises, over
    the float images N x 784 in [0, 1] (normal images: the training or calibration set), scored
    by `model` itself in fp32. The output's range sets a convolution's output scale."""
    ranges: dict[str, list[float]] = {}
    hooks = []

    def record(name: str):
        def hook(_module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            seen = ranges.setdefault(name, [0.0, 0.0])
            seen[0] = max(seen[0], float(inputs[0].max()))
            seen[1] = max(seen[1], float(output.clamp_min(0).max()))

        return hook

    for name, (layer, _) in _quantised(model).items():
        hooks.append(layer.register_forward_hook(record(name)))
    try:
        model.eval()
        for start in range(0, len(images), batch_size):
            model.score(images[start : start + batch_size])
    finally:
        for hook in hooks:
            hook.remove()
    if "encoder.0" in ranges:  # it reads the image: pixels / 255, exact in 8 bits with 1.0
        ranges["encoder.0"][0] = 1.0
    return {name: [float(low), float(high)] for name, (low, high) in ranges.items()}


@contextlib.contextmanager
def _engine(name: str) -> Iterator[None]:
    """Weights are packed for the engine current when they are packed; the packed weights keep
    their kernels. torch's setting is process-wide: put back at once."""
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        with warnings.catch_warnings():  # torch.ao's notice that the API moves to torchao
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.backends.quantized.engine = before


def _scale(value: float, levels: int) -> float:
    return max(value, 1e-8) / levels


def _quantise_weight(weight: torch.Tensor, axis: int) -> torch.Tensor:
    """7-bit symmetric weights, one scale per slice along `axis` (the output channels)."""
    weight = weight.detach().float()
    others = [d for d in range(weight.dim()) if d != axis]
    scales = weight.abs().amax(dim=others).clamp_min(1e-12) / WEIGHT_LEVELS
    zero = torch.zeros(len(scales), dtype=torch.long)
    return torch.quantize_per_channel(weight, scales.double(), zero, axis, torch.qint8)


class Int8Linear(nn.Module):
    """A Linear layer (and the ReLU after it) in int8: float in, float out, its input rounded
    to 8 bits with a fixed scale inside fbgemm's kernel."""

    def __init__(self, linear: nn.Linear, input_max: float, *, relu: bool) -> None:
        super().__init__()
        self.input_scale = _scale(input_max, INPUT_LEVELS)
        with _engine("fbgemm"):
            bias = None if linear.bias is None else linear.bias.detach().float()
            self.packed = torch.ops.quantized.linear_prepack(
                _quantise_weight(linear.weight, 0), bias
            )
        ops = torch.ops.quantized
        self.op = (
            ops.linear_with_input_q_dq_qweight_dq_relu_output_fp32
            if relu
            else ops.linear_with_input_q_dq_qweight_dq_output_fp32
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x.contiguous(), self.input_scale, 0, self.packed)


class Int8Conv(nn.Module):
    """A convolution and the ReLU after it in int8 (oneDNN): its input rounded to 8 bits with a
    fixed scale, its output with another, returned as float in channels-last."""

    def __init__(self, conv: nn.Conv2d, ranges: list[float]) -> None:
        super().__init__()
        self.input_scale = _scale(ranges[0], INPUT_LEVELS)
        self.output_scale = _scale(ranges[1], INPUT_LEVELS)
        bias = conv.bias.detach().float() if conv.bias is not None else None
        with _engine("onednn"):
            self.packed = torch.ops.quantized.conv2d_prepack(
                _quantise_weight(conv.weight, 0), bias, list(conv.stride), list(conv.padding),
                list(conv.dilation), conv.groups,
            )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        q = torch.quantize_per_tensor(x, self.input_scale, 0, torch.quint8)
        return torch.ops.quantized.conv2d_relu(q, self.packed, self.output_scale, 0).dequantize()


def quantise_layers(model: VAE, ranges: dict) -> None:
    """In place, on a copy: each layer that `_quantised` names replaced by its int8 form with the
    scales from `ranges` (activation_ranges), the ReLU after it folded in. Raises
    Int8RangesError when a layer has no range (ranges of another architecture)."""
    layers = _quantised(model)
    missing = [name for name in layers if name not in ranges]
    if missing:
        raise Int8RangesError(
            f"no int8 activation range for layer {missing[0]} (the ranges were measured on "
            "another model)"
        )
    for name, (layer, relu) in layers.items():
        body_name, index = name.split(".")
        body, i = getattr(model, body_name), int(index)
        low, high = (float(v) for v in ranges[name])
        if isinstance(layer, nn.Linear):
            body[i] = Int8Linear(layer, low, relu=relu)
        else:
            body[i] = Int8Conv(layer, [low, high])
        if relu:
            body[i + 1] = nn.Identity()
