"""Scoring whole batches of uint8 images on the chosen device.

The hot path: the caller hands over an N x 784 uint8 array; on CUDA it is copied into a pinned
host buffer and sent to the GPU without blocking, converted to float there (4x fewer bytes over
PCIe than float32), scored under inference mode, and the scores come back through a pinned
buffer. `submit` returns at once on CUDA, so the caller can poll and decode the next batch while
the GPU works; `PendingScores.result()` waits for the copy back.

On the CPU (issue 21, BENCHMARKS.md "CPU scoring precision"): the model is scored through a
prepared copy, made once per model and weights (`cpu_scoring_model`): the conv model's
convolutions in channels-last and its last transposed convolution rewritten as one matrix
product and col2im, its ReLUs in place, in chunks that stay in the cache (`CPU_CHUNK`); with
`precision` int8, its big layers in int8 with fixed activation scales measured at calibration
(detector.int8, issue 29: an image's score does not depend on its batch); with bf16, all of it
under CPU autocast to bf16. The scores are the model's own (fp32: within float rounding; int8 and
bf16: checked per bundle at calibration, see trainer.calibrate.validate_precisions). CUDA scores
the model itself, in fp32.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import weakref
from collections.abc import Collection
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from detector.bundle import Bundle, load_bundle
from detector.calibration import Calibration
from detector.config import IMAGE_PIXELS, PRECISIONS, DetectorSettings
from detector.int8 import quantise_layers
from detector.model import VAE, to_model_input
from detector.preprocess import LEGACY_PREPROCESSING, Preprocessing

logger = logging.getLogger(__name__)

_PINNED_SLOTS = 2  # one batch in flight on the GPU while the next one is being filled
# Images per forward pass on the CPU: the conv model's activations (about 25 KB per image) fall
# out of the cache in larger chunks (1.4-1.7x slower at 1,024); the MLP's GEMMs like them large.
CPU_CHUNK = {"conv": 256, "mlp": 1024}
# The precisions `auto` may pick on the CPU, fastest first, per model kind, measured side by
# side (BENCHMARKS.md, "CPU scoring precision"); a precision is only picked for a bundle whose
# calibration validated it, and only on a CPU that runs it fast: bf16 needs native bf16
# (AVX512-BF16 or AMX), without which it is slower than fp32; int8 needs torch's x86 int8
# kernels (fbgemm, oneDNN; AVX2 or better). int8 has fixed activation scales (detector.int8), so
# an image's score does not depend on the other images of its batch. The conv model's int8
# quantises its encoder's hidden convolution only (torch's quantised transposed convolutions
# were wrong (oneDNN) or slower than fp32 (fbgemm) here), so bf16 stays ahead of it.
AUTO_ORDER = {"mlp": ("int8", "bf16", "fp32"), "conv": ("bf16", "int8", "fp32")}


class DeviceError(ValueError):
    """The configured device does not exist here. The message is one line."""


def resolve_device(name: str) -> torch.device:
    """`auto` means CUDA when present, else CPU; any other name is passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"device {name!r} is unknown (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {name!r} asked for, but CUDA is not available here")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise DeviceError(f"device {name!r}: only {torch.cuda.device_count()} CUDA devices here")
    return device


class PrecisionError(DeviceError):
    """The configured precision cannot be used (on this device). The message is one line; a
    DeviceError, so the command line reports it as one (`vaewatch: error: ...`)."""


def resolve_precision(
    requested: str, device: torch.device, *, kind: str, validated: Collection[str] = ("fp32",)
) -> str:
    """The precision a detector scores in: fp32, int8 or bf16.

    int8 and bf16 are CPU paths (static quantisation with fbgemm/oneDNN's int8 kernels, oneDNN
    bf16): `auto` never picks them on any other device (CUDA scores in fp32), and asking for
    them there is an error. On the CPU `auto` picks the fastest precision for this model kind
    (`AUTO_ORDER`) that the bundle's calibration validated (`validated`); bf16 only on a CPU
    with native bf16, int8 only where torch's x86 int8 kernels run (`fast_int8`)."""
    if requested not in (*PRECISIONS, "auto"):
        raise PrecisionError(
            f"detector.precision {requested!r} is unknown (use fp32, int8, bf16 or auto)"
        )
    if device.type != "cpu":
        if requested != "auto" and requested != "fp32":
            raise PrecisionError(
                f"detector.precision {requested} runs on the CPU only, the device is {device} "
                "(use fp32 or auto)"
            )
        return "fp32"
    if requested != "auto":
        return requested
    usable = [p for p in AUTO_ORDER.get(kind, ()) if p in validated]
    if not native_bf16():
        usable = [p for p in usable if p != "bf16"]
    if not fast_int8():
        usable = [p for p in usable if p != "int8"]
    return usable[0] if usable else "fp32"


def native_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (else oneDNN emulates it, slower than fp32),
    and torch may use it: ATen restricted below AVX-512 (ATEN_CPU_CAPABILITY=avx2, as
    bench/cpu_modes.py runs the AVX2 case on an AVX-512 machine) rules it out."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False
    # Private: torch has no public query for it (torch.backends.mkldnn tells only whether oneDNN
    # is built in); this op is torch's own check, the one private torch API vaewatch uses.
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def fast_int8() -> bool:
    """Whether torch's int8 kernels that detector.int8 uses run here at speed: both engines
    built in (x86 builds) and ATen's vector kernels at AVX2 or better (what
    ATEN_CPU_CAPABILITY restricts; fbgemm needs AVX2)."""
    engines = torch.backends.quantized.supported_engines
    capability = torch.backends.cpu.get_cpu_capability()
    return "fbgemm" in engines and "onednn" in engines and capability.startswith("AVX")


class _ChannelsLast(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last)


def _is_k4s2p1(layer: nn.Module, kind: type) -> bool:
    """A stride-2, kernel-4, padding-1 convolution (or transposed one) of the plain sort."""
    return (
        type(layer) is kind
        and layer.kernel_size == (4, 4)
        and layer.stride == (2, 2)
        and layer.padding == (1, 1)
        and layer.dilation == (1, 1)
        and layer.groups == 1
        and layer.padding_mode == "zeros"
        and getattr(layer, "output_padding", (0, 0)) == (0, 0)
        and layer.bias is not None
    )


class _FoldedTransposedConv(nn.Module):
    """A k4 s2 p1 transposed convolution to few channels (the decoder's last, 32 -> 1) as what
    it is by definition: each input pixel's channels times the weights give its 4 x 4 patch of
    the output (one matrix product over all pixels of the batch), and overlapping patches add
    up (col2im, `F.fold`). The same map as the layer. On the AVX2 machine oneDNN's kernel for
    the layer took 2.0-2.5x as long, and a stride-1 convolution to 4x the channels with a pixel
    shuffle (2.25x the arithmetic) 3.5-4.7x (BENCHMARKS.md, issue 29)."""

    def __init__(self, deconv: nn.ConvTranspose2d) -> None:
        super().__init__()
        weight = deconv.weight.detach()  # in x out x 4 x 4
        # in x (out, 4, 4): F.fold's column order
        self.register_buffer("patches", weight.reshape(weight.shape[0], -1).contiguous())
        self.register_buffer("bias", deconv.bias.detach().view(1, -1, 1, 1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, channels, side, _ = x.shape
        # A view for channels-last input (what the layer before it writes): one row per pixel.
        pixels = x.permute(0, 2, 3, 1).reshape(n * side * side, channels)
        columns = (pixels @ self.patches).view(n, side * side, -1).transpose(1, 2)
        out = F.fold(columns, (2 * side, 2 * side), 4, stride=2, padding=1)
        return out.add_(self.bias)


def _rewrite_layers(model: VAE) -> None:
    """In place, on a copy: the encoder's and decoder's convolutions in channels-last (1.2-3x
    faster each on the 2-core machine), except a k4 s2 p1 transposed convolution to fewer than
    4 channels (the decoder's last, 32 -> 1), which becomes `_FoldedTransposedConv`; every ReLU
    in place (its input is a fresh tensor no one else reads; 5-8 % off the conv score in one
    thread). Other layers stay as they are."""
    for body in (model.encoder, model.decoder):
        if not isinstance(body, nn.Sequential):
            continue
        for i, layer in enumerate(body):
            if _is_k4s2p1(layer, nn.ConvTranspose2d) and layer.out_channels < 4:
                body[i] = _FoldedTransposedConv(layer)
            elif type(layer) in (nn.Conv2d, nn.ConvTranspose2d):
                layer.to(memory_format=torch.channels_last)
                body[i] = nn.Sequential(_ChannelsLast(), layer)
            elif type(layer) is nn.ReLU:
                body[i] = nn.ReLU(inplace=True)


class _LatentByProduct(nn.Module):
    """The latent density's -log q(z) with each component's inverse Cholesky factor computed
    once: the K triangular solves of every batch become one small matrix product (the same
    value up to float rounding; the solves were about a tenth of the MLP's score time in a
    profile on the AVX2 machine). Always in fp32, under bf16 autocast too, as the solves were."""

    def __init__(self, latent: nn.Module) -> None:
        super().__init__()
        tril = latent.scale_tril.double()
        inverse = torch.linalg.inv(tril)  # K x d x d, lower triangular
        k, d = latent.means.shape
        self.components = k
        # z @ projection - offset = (L_k^-1 (z - m_k)) for every k, side by side: N x (K d)
        self.register_buffer("projection", inverse.transpose(1, 2).permute(1, 0, 2).reshape(
            d, k * d).float())  # fmt: skip
        offset = torch.einsum("kij,kj->ki", inverse, latent.means.double())
        self.register_buffer("offset", offset.reshape(k * d).float())
        log_det = 2.0 * torch.log(torch.diagonal(tril, dim1=1, dim2=2)).sum(dim=1)
        constant = -0.5 * (log_det + d * math.log(2.0 * math.pi)) + latent.log_weights.double()
        self.register_buffer("constant", constant.float())

    def negative_log_density(self, z: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", enabled=False):
            solved = z.float() @ self.projection - self.offset
            solved = solved.view(len(z), self.components, -1)
            log_components = -0.5 * solved.pow(2).sum(dim=2) + self.constant
            return -torch.logsumexp(log_components, dim=1)


class _Bf16(nn.Module):
    """Scores `model` under CPU autocast to bf16: convolutions and matrix products in bf16,
    the likelihood, the latent density and the softmax in fp32 (the model casts to float)."""

    def __init__(self, model: VAE) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def score(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.model.score(x).float()


def prepare_cpu_model(model: VAE, precision: str, *, int8_ranges: dict | None = None) -> VAE:
    """A copy of `model` that scores the same on the CPU, faster: layers rewritten
    (`_rewrite_layers`), its big layers in int8 with the scales of `int8_ranges` (`precision`
    int8: the activation ranges its calibration measured, detector.int8) or everything under
    bf16 autocast (bf16). The model itself is not changed."""
    if precision not in PRECISIONS:
        raise PrecisionError(f"precision {precision!r} is unknown (use fp32, int8 or bf16)")
    if precision == "int8" and not int8_ranges:
        raise PrecisionError(
            "precision int8 needs the activation ranges that calibration measures: this bundle "
            "has none (written before int8 scales were stored: `vaewatch recalibrate` it, or "
            "use fp32)"
        )
    prepared = copy.deepcopy(model).cpu().eval()
    if prepared.latent is not None:
        prepared.latent = _LatentByProduct(prepared.latent)
    if precision == "int8":
        quantise_layers(prepared, int8_ranges)
    _rewrite_layers(prepared)
    if precision == "bf16":
        prepared = _Bf16(prepared)
    return prepared.eval()


# model -> {precision: (weights and ranges key, prepared copy)}; a model that is gone takes its
# copies along.
_PREPARED: weakref.WeakKeyDictionary[VAE, dict[str, tuple[tuple, VAE]]] = (
    weakref.WeakKeyDictionary()
)


def _weights_key(model: VAE) -> tuple:
    """Changes whenever a parameter or buffer is replaced or written in place (training,
    load_state_dict, set_density, set_score_normalisation), so a stale copy is never used. An
    inference tensor has no version counter: a model holding one is prepared again each time.
    Writes through `tensor.data` bypass the version counter (PyTorch's own caveat): weights are
    changed through load_state_dict or in place under no_grad, never through `.data`."""
    try:
        return tuple((t.data_ptr(), t._version) for t in chain(model.parameters(), model.buffers()))
    except RuntimeError:
        return (object(),)


def cpu_scoring_model(
    model: VAE, precision: str = "fp32", *, int8_ranges: dict | None = None
) -> VAE:
    """The prepared copy of `model` for `precision` (`prepare_cpu_model`), made once and reused
    while the model's weights (and, for int8, the ranges) stay the same."""
    ranges = json.dumps(int8_ranges, sort_keys=True) if precision == "int8" else None
    key = (_weights_key(model), ranges)
    copies = _PREPARED.setdefault(model, {})
    cached = copies.get(precision)
    if cached is None or cached[0] != key:
        prepared = prepare_cpu_model(model, precision, int8_ranges=int8_ranges)
        copies[precision] = cached = (key, prepared)
    return cached[1]


def as_image_batch(images: np.ndarray) -> np.ndarray:
    """Check and flatten a batch of 28x28 uint8 images to a C-contiguous N x 784 array."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 0..255, got {images.dtype}")
    if images.ndim == 3 and images.shape[1:] == (28, 28):
        images = images.reshape(len(images), IMAGE_PIXELS)
    if images.ndim != 2 or images.shape[1] != IMAGE_PIXELS:
        raise ValueError(f"images must be N x 784 or N x 28 x 28, got shape {images.shape}")
    return np.ascontiguousarray(images)


@torch.inference_mode()
def score_batches(
    model: VAE,
    images: torch.Tensor,
    *,
    device: torch.device,
    batch_size: int,
    precision: str = "fp32",
    int8_ranges: dict | None = None,
) -> torch.Tensor:
    """Deterministic scores of uint8 N x 784 images, `batch_size` at a time on `device`, as a
    float32 CPU tensor. The model must be in eval mode (dropout off). On the CPU the model's
    prepared copy scores (`cpu_scoring_model`, in `precision`; int8 with the activation ranges
    of its calibration, `int8_ranges`), in chunks of at most `CPU_CHUNK`; elsewhere the model
    itself, in fp32 (`precision` must be fp32)."""
    if device.type == "cpu":
        scorer = cpu_scoring_model(model, precision, int8_ranges=int8_ranges)
        batch_size = min(batch_size, CPU_CHUNK.get(model.config.kind, batch_size))
    elif precision != "fp32":
        raise PrecisionError(f"precision {precision} runs on the CPU only, not on {device}")
    else:
        scorer = model
    parts = [
        scorer.score(to_model_input(images[i : i + batch_size].to(device))).float().cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(parts) if parts else torch.empty(0)


@dataclass(frozen=True)
class Scores:
    """Per-image results, aligned with the input rows."""

    scores: np.ndarray  # float32 anomaly scores (VAE.score, docs/model.md)
    p_values: np.ndarray  # float64 conformal p-values
    anomalous: np.ndarray  # bool, score > threshold

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def judged(cls, scores: np.ndarray, calibration: Calibration) -> Scores:
        """Raw scores with their p-values and decisions under `calibration`."""
        return cls(
            scores=scores,
            p_values=calibration.p_values(scores),
            anomalous=calibration.is_anomaly(scores),
        )


class PendingScores:
    """Scores still on their way back from the device; `result()` waits for them."""

    def __init__(self, calibration: Calibration, host: torch.Tensor, done: torch.cuda.Event | None):
        self._calibration = calibration
        self._host = host
        self._done = done

    def done(self) -> bool:
        """True once the scores are on the host, so `result()` will not wait."""
        return self._done is None or self._done.query()

    def result(self) -> Scores:
        if self._done is not None:
            self._done.synchronize()
        return Scores.judged(self._host.numpy().copy(), self._calibration)


class Detector:
    """A loaded model and its calibration, ready to score batches on one device."""

    def __init__(
        self,
        model: VAE,
        calibration: Calibration,
        *,
        version: str,
        device: str = "auto",
        max_batch_size: int = 8192,
        precision: str = "auto",
        preprocessing: Preprocessing = LEGACY_PREPROCESSING,
    ) -> None:
        self.device = resolve_device(device)
        self.preprocessing = preprocessing  # how image files become this model's input
        self.model = model.to(self.device).eval()
        self.calibration = calibration
        self.version = version
        self.max_batch_size = max_batch_size
        self.requested_precision = precision
        self.precision = resolve_precision(
            precision,
            self.device,
            kind=model.config.kind,
            validated=calibration.validated_precisions,
        )
        # int8's fixed activation scales, from the calibration (None: not measured)
        self.int8_ranges = calibration.int8_ranges
        if self.precision != calibration.precision:
            validated = self.precision in calibration.validated_precisions
            logger.log(
                logging.INFO if validated else logging.WARNING,
                "model %s was calibrated in %s and is scored in %s (%s at calibration)",
                version, calibration.precision, self.precision,
                "validated" if validated else "NOT validated",
            )  # fmt: skip
        self._pinned_in: list[torch.Tensor] = []
        self._slot_free: list[torch.cuda.Event | None] = []
        self._next_slot = 0
        if self.device.type == "cuda":
            self._pinned_in = [
                torch.empty((max_batch_size, IMAGE_PIXELS), dtype=torch.uint8).pin_memory()
                for _ in range(_PINNED_SLOTS)
            ]
            self._slot_free = [None] * _PINNED_SLOTS
        else:
            # prepared now, not on the first batch (and a bundle without int8 ranges fails here)
            cpu_scoring_model(self.model, self.precision, int8_ranges=self.int8_ranges)

    @classmethod
    def from_bundle(
        cls, bundle: str | Path | Bundle, settings: DetectorSettings | None = None
    ) -> Detector:
        """The one way to make a detector of a bundle (its directory, or one already loaded),
        scoring where, in what precision and in the batches `settings` say (the `detector`
        section of the settings; its defaults when None)."""
        if not isinstance(bundle, Bundle):
            bundle = load_bundle(bundle)
        settings = settings or DetectorSettings()
        return cls(
            bundle.model,
            bundle.calibration,
            version=bundle.version,
            device=settings.device,
            max_batch_size=settings.max_batch_size,
            precision=settings.precision,
            preprocessing=bundle.preprocessing,
        )

    @property
    def settings(self) -> DetectorSettings:
        """Where and in what batches this detector scores, with the device resolved: what another
        bundle needs to be loaded alike (a hot swap must not move to another device). The
        precision stays as asked (`auto` is resolved again for each bundle's calibration)."""
        return DetectorSettings(
            device=str(self.device),
            max_batch_size=self.max_batch_size,
            precision=self.requested_precision,
        )

    @property
    def threshold(self) -> float:
        return self.calibration.threshold

    @torch.inference_mode()
    def _score_on_device(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.score(to_model_input(images)).float()

    def submit(self, images: np.ndarray) -> PendingScores:
        """Start scoring a batch; on CUDA this returns before the GPU has finished."""
        images = as_image_batch(images)
        if self.device.type != "cuda":
            return PendingScores(self.calibration, self._score_cpu(images), None)
        return self._submit_cuda(images)

    def score(self, images: np.ndarray) -> Scores:
        """Score a batch of any size and wait for the result."""
        return self.submit(images).result()

    def _score_cpu(self, images: np.ndarray) -> torch.Tensor:
        return score_batches(
            self.model,
            torch.from_numpy(images),
            device=self.device,
            batch_size=self.max_batch_size,
            precision=self.precision,
            int8_ranges=self.int8_ranges,
        )

    def _submit_cuda(self, images: np.ndarray) -> PendingScores:
        host_out = torch.empty(len(images), dtype=torch.float32).pin_memory()
        for start in range(0, len(images), self.max_batch_size):
            chunk = images[start : start + self.max_batch_size]
            slot = self._next_slot
            self._next_slot = (slot + 1) % _PINNED_SLOTS
            if self._slot_free[slot] is not None:
                # The GPU may still be reading this pinned buffer from an earlier batch.
                self._slot_free[slot].synchronize()
            pinned = self._pinned_in[slot][: len(chunk)]
            pinned.numpy()[:] = chunk
            on_device = pinned.to(self.device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
            self._slot_free[slot] = copied
            scores = self._score_on_device(on_device)
            host_out[start : start + len(chunk)].copy_(scores, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return PendingScores(self.calibration, host_out, done)
