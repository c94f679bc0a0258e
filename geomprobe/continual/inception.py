"""The FID Inception-v3 feature network (2048-d pool3 features), in plain torch.

Adapted from torch-fidelity 0.4.0 (``feature_extractor_inceptionv3.py`` and
``interpolate_compat_tensorflow.py``, https://github.com/toshas/torch-fidelity), itself adapted
from pytorch-fid (https://github.com/mseitzer/pytorch-fid); both are distributed under the
Apache License 2.0. The network is the TensorFlow ``inception-2015-12-05`` graph used by the
original FID code, whose weights are also Apache-2.0 (tensorflow/models).

No weights are shipped or downloaded: :func:`load_inception_weights` reads a local copy of the
published state dict (torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` or
pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``; both use the same parameter names, those
of torchvision's ``Inception3`` without the auxiliary classifier, so no key mapping is needed).
BatchNorm ``num_batches_tracked`` counters are optional in the file (unused in eval mode).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from geomprobe.errors import DataError, UsageError
from geomprobe.probe.store import file_sha256

INPUT_SIZE = 299
NUM_FEATURES = 2048
NUM_LOGITS = 1008  # the 2015 graph's classifier (1000 ImageNet classes + 8 unused); kept for the keys
FORWARD_BATCH = 64


def resize_bilinear_tf1(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """TensorFlow 1.x ``resize_bilinear`` with ``align_corners=False`` (no half-pixel offset).

    x: (N, C, H, W) float; size: (out_h, out_w). Output pixel (i, j) samples the input at
    (i * H / out_h, j * W / out_w), interpolating between floor(.) and floor(.) + 1 (clamped to
    the last row/column). Coordinates are computed in float32 as TF1 does, which makes this
    bit-exact with TF1 on CPU (torch-fidelity's "slow" method).
    """
    out_h, out_w = size
    in_h, in_w = x.shape[2], x.shape[3]

    def grid(out_n: int, in_n: int, dtype: torch.dtype):
        src = torch.arange(out_n, dtype=dtype, device=x.device) * torch.tensor(in_n / out_n, dtype=torch.float32)
        lo = src.long()
        hi = (lo + 1).clamp_max(in_n - 1)
        return lo, hi, src - lo.to(src.dtype)

    y_lo, y_hi, dy = grid(out_h, in_h, x.dtype)
    x_lo, x_hi, dx = grid(out_w, in_w, x.dtype)
    top, bottom = x[:, :, y_lo, :], x[:, :, y_hi, :]
    top = top[:, :, :, x_lo] + (top[:, :, :, x_hi] - top[:, :, :, x_lo]) * dx.view(1, 1, 1, out_w)
    bottom = bottom[:, :, :, x_lo] + (bottom[:, :, :, x_hi] - bottom[:, :, :, x_lo]) * dx.view(1, 1, 1, out_w)
    return top + (bottom - top) * dy.view(1, 1, out_h, 1)


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **conv_kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    """TensorFlow's 3x3 'SAME' average pool: padded zeros are not counted in the average."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """Mixed_5b/5c/5d (35x35): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1 -> 224 + pool_features channels."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_tf_avg_pool_3x3(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    """Mixed_6a (35x35 -> 17x17): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2 -> 480 + in_channels channels."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3(x)
        b3d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b3d, bp], 1)


class InceptionC(nn.Module):
    """Mixed_6b..6e (17x17): 1x1 | factorised 7x7 | double factorised 7x7 | avgpool-1x1 -> 768 channels."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7d = layer(b7d)
        bp = self.branch_pool(_tf_avg_pool_3x3(x))
        return torch.cat([b1, b7, b7d, bp], 1)


class InceptionD(nn.Module):
    """Mixed_7a (17x17 -> 8x8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2 -> 512 + in_channels channels."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], 1)


class InceptionE(nn.Module):
    """Mixed_7b / Mixed_7c (8x8): 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1 -> 2048 channels.

    ``max_pool=False`` (Mixed_7b) uses TF's average pool in the pool branch; the 2015 graph's
    Mixed_7c uses a 3x3 max pool there instead (``max_pool=True``), as the FID network must.
    """

    def __init__(self, in_channels: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _tf_avg_pool_3x3(x)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, b3d, bp], 1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 as in the FID reference code (TF graph inception-2015-12-05), pool3 features.

    forward(x): x (N, C, H, W) float in [-1, 1], C = 1 or 3, any H, W -> (N, 2048) float32.
    Preprocessing is torch-fidelity's for uint8 images: quantise to 0..255, grey -> 3 channels,
    TF1-compatible bilinear resize to 299x299, then (x - 128) / 128. Runs in eval mode under
    ``torch.no_grad`` in chunks of ``batch_size`` images. ``name`` identifies the weights
    (``inception-v3-fid@<first 12 hex of the file's SHA-256>`` after :func:`load_inception_weights`).
    """

    num_features = NUM_FEATURES

    def __init__(self, batch_size: int = FORWARD_BATCH):
        super().__init__()
        self.batch_size = batch_size
        self.name = "inception-v3-fid@unloaded"
        self.weights_sha256: str | None = None
        self.weights_path: str | None = None

        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(NUM_FEATURES, NUM_LOGITS)  # unused for features; part of the published weights
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def preprocess(x: torch.Tensor) -> torch.Tensor:
        """(N, 1|3, H, W) in [-1, 1] -> (N, 3, 299, 299) float32 in [-1, 1), the network's input."""
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected images (N, 1 or 3, H, W), got shape {tuple(x.shape)}")
        x = ((x.float().clamp(-1, 1) + 1) * 127.5).round()  # the uint8 image torch-fidelity expects
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = resize_bilinear_tf1(x, (INPUT_SIZE, INPUT_SIZE))
        return (x - 128) / 128

    def pool3(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, 299, 299) preprocessed input -> (N, 2048) average-pooled Mixed_7c features."""
        x = self.Conv2d_1a_3x3(x)  # N x 32 x 149 x 149
        x = self.Conv2d_2a_3x3(x)  # N x 32 x 147 x 147
        x = self.Conv2d_2b_3x3(x)  # N x 64 x 147 x 147
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # N x 64 x 73 x 73
        x = self.Conv2d_3b_1x1(x)  # N x 80 x 73 x 73
        x = self.Conv2d_4a_3x3(x)  # N x 192 x 71 x 71
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # N x 192 x 35 x 35
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # N x 288 x 35 x 35
        x = self.Mixed_6a(x)  # N x 768 x 17 x 17
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # N x 768 x 17 x 17
        x = self.Mixed_7a(x)  # N x 1280 x 8 x 8
        x = self.Mixed_7c(self.Mixed_7b(x))  # N x 2048 x 8 x 8
        return F.adaptive_avg_pool2d(x, 1).flatten(1)  # N x 2048

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = self.Conv2d_1a_3x3.conv.weight.device
        chunks = [
            self.pool3(self.preprocess(x[s : s + self.batch_size].to(device)))
            for s in range(0, len(x), self.batch_size)
        ]
        if not chunks:
            return torch.zeros(0, NUM_FEATURES, device=device)
        return torch.cat(chunks).float()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _read_state_dict(path: Path) -> dict:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise DataError(
                f"Inception weights {path} are not a readable safetensors file ({_one_line(exc)})"
            ) from None
    if suffix in (".pth", ".pt"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError, RuntimeError (bad zip), EOFError, ...
            raise DataError(
                f"Inception weights {path} are not a readable torch state dict ({_one_line(exc)})"
            ) from None
        if not isinstance(state, dict):
            raise DataError(f"Inception weights {path} hold a {type(state).__name__}, not a state dict")
        return state
    raise UsageError(
        f"Inception weights {path}: unsupported file type {suffix or '(none)'}; expected .safetensors, .pth or .pt"
    )


def check_state_dict(state: dict, model: nn.Module, path: str | Path = "<state dict>") -> dict:
    """Validate ``state`` against ``model``'s keys and shapes; return a plain dict for strict loading.

    ``*.num_batches_tracked`` entries may be present or absent (BatchNorm fills them in when
    they are missing from a dict without version metadata). Raises UsageError naming the file
    and the first offending key (in the model's parameter order).
    """
    expected = {k: v.shape for k, v in model.state_dict().items()}
    optional = {k for k in expected if k.endswith(".num_batches_tracked")}
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise DataError(f"Inception weights {path}: entry {key!r} is not a named tensor")
    missing = [k for k in expected if k not in state and k not in optional]
    unexpected = [k for k in state if k not in expected]
    if missing:
        extra = f" (and unexpected key {unexpected[0]!r})" if unexpected else ""
        raise UsageError(
            f"Inception weights {path}: missing key {missing[0]!r}{extra}; "
            f"{len(missing)} missing, {len(unexpected)} unexpected"
        )
    if unexpected:
        raise UsageError(f"Inception weights {path}: unexpected key {unexpected[0]!r}; {len(unexpected)} unexpected")
    for key, shape in expected.items():
        if key in state and state[key].shape != shape:
            raise UsageError(
                f"Inception weights {path}: key {key!r} has shape {tuple(state[key].shape)}, expected {tuple(shape)}"
            )
    return {k: v for k, v in state.items() if k not in optional}  # plain dict: no version metadata


def load_inception_weights(path: str | Path, batch_size: int = FORWARD_BATCH) -> FIDInceptionV3:
    """FIDInceptionV3 with the weights of a local ``.safetensors`` or ``.pth``/``.pt`` state dict.

    ``.pth``/``.pt`` files are read with ``torch.load(weights_only=True)`` (tensors only, no code
    execution). Errors are one line naming the file: UsageError for a missing file, an unknown
    extension or wrong/missing/unexpected keys or shapes; DataError for an unreadable file.
    The returned network's ``weights_sha256`` is the file's SHA-256 and its ``name`` is
    ``inception-v3-fid@<first 12 hex digits>``.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"Inception weights file not found: {path}")
    state = _read_state_dict(path)
    model = FIDInceptionV3(batch_size=batch_size)
    state = check_state_dict(state, model, path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # e.g. a dtype that cannot be copied into float parameters
        raise UsageError(f"Inception weights {path}: {_one_line(exc)}") from None
    model.requires_grad_(False)
    model.eval()
    model.weights_sha256 = file_sha256(path)
    model.weights_path = str(path)
    model.name = f"inception-v3-fid@{model.weights_sha256[:12]}"
    return model
