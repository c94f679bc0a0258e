"""Timestep specs and SNR bands (docs/design.md §4).

A timestep ``t`` is the diffusers scheduler index in ``0..N-1``; the UNet receives ``t`` and
``alpha_bar_t = scheduler.alphas_cumprod[t]``. SNR(t) = alpha_bar_t / (1 - alpha_bar_t).

Grammar of a t-spec (whitespace ignored)::

    A..B        A, A+100, ..., up to B (inclusive when reached)
    A..B:S      the same with step S
    a,b,c       explicit list (duplicates removed, order kept sorted)
    high-snr    SNR >= 1           (t <= 258 for the linear schedule)
    mid-snr     0.01 <= SNR < 1    (259 <= t <= 673)
    low-snr     SNR < 0.01         (t >= 674)
    all         every t
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from geomprobe.errors import UsageError

BAND_NAMES = ("high-snr", "mid-snr", "low-snr", "all")
DEFAULT_RANGE_STEP = 100
HIGH_SNR_THRESHOLD = 1.0
LOW_SNR_THRESHOLD = 0.01


def linear_alphas_cumprod(
    num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> np.ndarray:
    """alpha_bar_t of the DDPM linear schedule, shape (N,), float64 (same as diffusers')."""
    betas = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
    return np.cumprod(1.0 - betas)


def snr(alphas_cumprod: np.ndarray) -> np.ndarray:
    """SNR(t) = alpha_bar_t / (1 - alpha_bar_t), elementwise, same shape as the input."""
    a = np.asarray(alphas_cumprod, dtype=np.float64)
    return a / (1.0 - a)


@dataclass(frozen=True)
class TimestepSpec:
    """A parsed t-spec: either explicit timesteps (one result per t) or a band (t drawn per row).

    ``timesteps`` holds every t the spec covers, sorted ascending. ``band`` is the band name
    when the spec named one (``None`` for ranges and lists).
    """

    text: str
    timesteps: tuple[int, ...]
    band: str | None = None

    @property
    def is_band(self) -> bool:
        return self.band is not None

    @property
    def label(self) -> str:
        """Name used in stores and tables: ``band-low-snr`` for a band, ``t700`` otherwise."""
        return f"band-{self.band}" if self.band else ",".join(f"t{t}" for t in self.timesteps)


def band_timesteps(
    band: str,
    alphas_cumprod: np.ndarray | None = None,
    high_threshold: float = HIGH_SNR_THRESHOLD,
    low_threshold: float = LOW_SNR_THRESHOLD,
) -> tuple[int, ...]:
    """Timesteps of an SNR band (``high-snr``, ``mid-snr``, ``low-snr``, ``all``)."""
    if alphas_cumprod is None:
        alphas_cumprod = linear_alphas_cumprod()
    if not 0 < low_threshold < high_threshold:
        raise UsageError(f"SNR thresholds must satisfy 0 < low < high, got low={low_threshold}, high={high_threshold}")
    s = snr(alphas_cumprod)
    if band == "all":
        mask = np.ones_like(s, dtype=bool)
    elif band == "high-snr":
        mask = s >= high_threshold
    elif band == "mid-snr":
        mask = (s >= low_threshold) & (s < high_threshold)
    elif band == "low-snr":
        mask = s < low_threshold
    else:
        raise UsageError(f"unknown SNR band {band!r}; expected one of {', '.join(BAND_NAMES)}")
    ts = tuple(int(t) for t in np.nonzero(mask)[0])
    if not ts:
        raise UsageError(f"SNR band {band!r} is empty for this schedule")
    return ts


_RANGE = re.compile(r"^(\d+)\.\.(\d+)(?::(\d+))?$")
_LIST = re.compile(r"^\d+(,\d+)*$")


def parse_timesteps(
    spec: str,
    num_train_timesteps: int = 1000,
    alphas_cumprod: np.ndarray | None = None,
    high_threshold: float = HIGH_SNR_THRESHOLD,
    low_threshold: float = LOW_SNR_THRESHOLD,
) -> TimestepSpec:
    """Parse a t-spec into a :class:`TimestepSpec`; raise :class:`UsageError` on any bad spec.

    Errors: empty spec, malformed text, reversed range (A > B), zero step, t outside
    ``0..num_train_timesteps-1``, a range that selects nothing.
    """
    if not isinstance(spec, str):
        raise UsageError(f"t-spec must be a string, got {type(spec).__name__}")
    text = re.sub(r"\s+", "", spec)
    if not text:
        raise UsageError("empty t-spec; use e.g. '100..900', '100..900:50', '100,300' or 'low-snr'")
    if text.lower() in BAND_NAMES:
        band = text.lower()
        if alphas_cumprod is None:
            alphas_cumprod = linear_alphas_cumprod(num_train_timesteps)
        ts = band_timesteps(band, alphas_cumprod, high_threshold, low_threshold)
        return TimestepSpec(text=band, timesteps=ts, band=band)
    m = _RANGE.match(text)
    if m:
        start, stop = int(m.group(1)), int(m.group(2))
        step = int(m.group(3)) if m.group(3) is not None else DEFAULT_RANGE_STEP
        if step <= 0:
            raise UsageError(f"t-spec {spec!r}: step must be positive")
        if start > stop:
            raise UsageError(f"t-spec {spec!r}: range is reversed ({start} > {stop})")
        if stop >= num_train_timesteps:  # before the range is built: '0..99999999999' must not allocate it
            raise UsageError(f"t-spec {spec!r}: timestep {stop} is outside 0..{num_train_timesteps - 1}")
        ts = tuple(range(start, stop + 1, step))
    elif _LIST.match(text):
        ts = tuple(sorted({int(x) for x in text.split(",")}))
    else:
        raise UsageError(f"malformed t-spec {spec!r}; use 'A..B', 'A..B:S', 'a,b,c' or one of {', '.join(BAND_NAMES)}")
    bad = [t for t in ts if not 0 <= t < num_train_timesteps]
    if bad:
        raise UsageError(f"t-spec {spec!r}: timestep {bad[0]} is outside 0..{num_train_timesteps - 1}")
    return TimestepSpec(text=text, timesteps=ts, band=None)


def format_timesteps(timesteps: tuple[int, ...] | list[int]) -> str:
    """The canonical list spec ``a,b,c`` of some timesteps (round-trips through the parser)."""
    return ",".join(str(int(t)) for t in sorted(set(timesteps)))
