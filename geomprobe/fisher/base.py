"""The one Fisher protocol and its HDF5 format.

Every representation of an empirical Fisher F (P x P, symmetric positive semi-definite) answers
the same questions (the nngeometry/curvlinops pattern, docs/design.md §1):

    mv(v)        F v                     v: (P,) or (P, m)  ->  same shape
    quad(v)      v^T F v                 v: (P,)            ->  0-dim tensor
    trace()      tr F                                        ->  float
    frobenius()  ||F||_F                                     ->  float
    diag()       diag F                                      ->  (P,)
    top_eigen(k) leading eigenpairs      -> (eigenvalues (r,) descending, eigenvectors (P, r)),
                 r = min(k, rank of the representation)
    penalty(theta, theta_star, strength) strength/2 (theta - theta*)^T F (theta - theta*)
                 (the EWC term, docs/design.md §6; differentiable in theta)
    save(path) / load(path)   HDF5 with attributes; ``load_fisher`` dispatches on ``kind``.

Vectors are torch tensors (numpy arrays are accepted and converted). Arithmetic happens in the
promoted dtype of the argument and the stored tensors, so a float64 test reference stays
float64; ``penalty`` returns the dtype of ``theta`` so it adds cleanly to a float32 loss.
"""

from __future__ import annotations

import itertools
import json
import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import h5py
import numpy as np
import torch

from geomprobe.errors import DataError, UsageError

FORMAT_VERSION = 1
DENSE_LIMIT = 20_000  # to_dense() refuses larger P: a 20k x 20k float32 matrix is 1.6 GB


@dataclass
class FisherInfo:
    """Where a Fisher came from (saved as HDF5 attributes).

    ``t_range``: the t-spec or band it covers (e.g. ``"700"`` or ``"low-snr"``); ``n``: number of
    per-sample gradients it was estimated from; ``checkpoint``: ``{"path": ..., "checksum": ...}``
    of the model; ``param_names`` / ``param_shapes``: the flat layout of a (P,) vector;
    ``centered``: covariance (G - 1 mu^T) instead of second moment; ``extra``: anything else
    (JSON-serialisable).
    """

    t_range: str = ""
    n: int = 0
    checkpoint: dict[str, Any] = field(default_factory=dict)
    param_names: list[str] = field(default_factory=list)
    param_shapes: list[list[int]] = field(default_factory=list)
    centered: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def as_tensor(v: Any) -> torch.Tensor:
    """A torch tensor view of ``v`` (numpy arrays are wrapped without copying)."""
    if isinstance(v, torch.Tensor):
        return v
    return torch.as_tensor(np.asarray(v))


def promoted(a: torch.Tensor, *others: torch.Tensor) -> torch.dtype:
    """The promoted dtype of ``a`` (the default float dtype if ``a`` is not floating) and ``others``."""
    dtype = a.dtype if a.is_floating_point() else torch.get_default_dtype()
    for o in others:
        dtype = torch.promote_types(dtype, o.dtype)
    return dtype


class FisherMatrix(ABC):
    """Abstract empirical Fisher (P x P). Subclasses store one representation of it."""

    kind: ClassVar[str] = ""
    _registry: ClassVar[dict[str, type[FisherMatrix]]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.kind:
            FisherMatrix._registry[cls.kind] = cls

    def __init__(self, info: FisherInfo | None = None):
        self.info = info if info is not None else FisherInfo()
        self.path: Path | None = None  # the file it was loaded from (named in error messages)

    # ---- the protocol
    @property
    @abstractmethod
    def P(self) -> int:
        """Number of parameters (the matrix is P x P)."""

    @abstractmethod
    def mv(self, v: torch.Tensor) -> torch.Tensor:
        """F v for v of shape (P,) or (P, m); returns the same shape."""

    def quad(self, v: torch.Tensor) -> torch.Tensor:
        """v^T F v for v of shape (P,); a 0-dim tensor."""
        v = self._check_vector(v)
        return torch.dot(v.to(promoted(v, *self._tensors())), self.mv(v))

    @abstractmethod
    def trace(self) -> float:
        """Tr F."""

    @abstractmethod
    def frobenius(self) -> float:
        """||F||_F."""

    @abstractmethod
    def diag(self) -> torch.Tensor:
        """Diag F, shape (P,)."""

    @abstractmethod
    def top_eigen(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Leading eigenpairs: eigenvalues (r,) descending and orthonormal eigenvectors (P, r).

        r = min(k, rank of the representation); eigenvector signs are arbitrary.
        """

    @abstractmethod
    def penalty(self, theta: torch.Tensor, theta_star: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        """EWC term strength/2 (theta - theta*)^T F (theta - theta*): a 0-dim tensor in theta's dtype.

        theta: (P,) flat parameters (requires_grad for training); theta_star: (P,) anchor
        (treated as a constant). The gradient in theta is strength * F (theta - theta*).
        """

    def to_dense(self) -> torch.Tensor:
        """The explicit (P, P) matrix in float64 (small P only; for tests and inspection)."""
        if self.P > DENSE_LIMIT:
            raise UsageError(f"refusing to form a dense {self.P} x {self.P} Fisher (limit P <= {DENSE_LIMIT})")
        return self.mv(torch.eye(self.P, dtype=torch.float64))

    # ---- storage
    @abstractmethod
    def _tensors(self) -> tuple[torch.Tensor, ...]:
        """The stored tensors (used for dtype promotion)."""

    @abstractmethod
    def _write(self, f: h5py.File) -> None:
        """Write the representation's datasets and attributes."""

    @classmethod
    @abstractmethod
    def _read(cls, f: h5py.File, info: FisherInfo) -> FisherMatrix:
        """Rebuild from an open file written by ``_write``."""

    def save(self, path: str | Path) -> Path:
        """Write an HDF5 file (to ``path.tmp``, renamed when complete). Returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with h5py.File(tmp, "w") as f:
            f.attrs["kind"] = self.kind
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["P"] = self.P
            info = asdict(self.info)
            for key in ("t_range", "n", "centered"):
                f.attrs[key] = info[key]
            for key in ("checkpoint", "param_names", "param_shapes", "extra"):
                f.attrs[key] = json.dumps(info[key])
            if info["param_names"]:
                f.attrs["layout_digest"] = layout_digest(info["param_names"], info["param_shapes"])
            self._write(f)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> FisherMatrix:
        """Read a file written by ``save``; the kind in the file must match ``cls`` (or use load_fisher)."""
        fisher = load_fisher(path)
        if cls is not FisherMatrix and not isinstance(fisher, cls):
            raise DataError(f"{path} holds a {fisher.kind!r} Fisher, not {cls.kind!r}")
        return fisher

    # ---- helpers for subclasses
    def _check_vector(self, v: Any, allow_matrix: bool = False) -> torch.Tensor:
        v = as_tensor(v)
        ok = v.dim() == 1 or (allow_matrix and v.dim() == 2)
        if not ok or v.shape[0] != self.P:
            want = "(P,) or (P, m)" if allow_matrix else "(P,)"
            raise UsageError(f"expected a vector of shape {want} with P={self.P}, got {tuple(v.shape)}")
        return v

    def _difference(self, theta: torch.Tensor, theta_star: torch.Tensor) -> torch.Tensor:
        theta = self._check_vector(theta)
        theta_star = self._check_vector(theta_star)
        return theta - theta_star.detach().to(theta.dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(P={self.P}, n={self.info.n}, t_range={self.info.t_range!r})"


def _info_from_attrs(f: h5py.File) -> FisherInfo:
    def js(key, default):
        return json.loads(f.attrs[key]) if key in f.attrs else default

    return FisherInfo(
        t_range=str(f.attrs.get("t_range", "")),
        n=int(f.attrs.get("n", 0)),
        checkpoint=js("checkpoint", {}),
        param_names=js("param_names", []),
        param_shapes=js("param_shapes", []),
        centered=bool(f.attrs.get("centered", False)),
        extra=js("extra", {}),
    )


def layout_digest(names: list[str], shapes: list[list[int]]) -> str:
    """SHA-256 (first 16 hex digits) of a flat parameter layout: the names and shapes, in order.

    Args:
        names: parameter names, in the order they fill a (P,) vector.
        shapes: their shapes.

    Returns:
        16 hex digits; equal layouts give equal digests.
    """
    import hashlib

    text = json.dumps([[str(n), [int(d) for d in s]] for n, s in zip(names, shapes, strict=True)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_fisher(
    path: str | Path,
    checksum: str | None = None,
    names: list[str] | None = None,
    shapes: list[list[int]] | None = None,
) -> FisherMatrix:
    """Load any Fisher file written by ``FisherMatrix.save``, dispatching on its ``kind`` attribute.

    Args:
        path: the HDF5 file.
        checksum: when given, the ``checkpoint_checksum`` (checkpoints.py) of the model the caller means the
            Fisher to belong to; the file's ``checkpoint.checksum`` must equal it.
        names: when given, the caller's parameter names in flat order (``ParamLayout.names``); the
            file's recorded names must equal them.
        shapes: with ``names``, their shapes (``ParamLayout.shapes``); the file's P and recorded shapes
            must equal them.

    Returns:
        The FisherMatrix, with ``.path`` set to ``path``.

    Raises:
        DataError: one line naming the file: missing, unreadable, unknown kind, or estimated at another
            checkpoint or over another parameter layout than the caller's.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Fisher file not found: {path}")
    try:
        with h5py.File(path, "r") as f:
            kind = f.attrs.get("kind")
            if isinstance(kind, bytes):
                kind = kind.decode()
            if kind not in FisherMatrix._registry:
                raise DataError(f"{path}: unknown Fisher kind {kind!r}")
            fisher = FisherMatrix._registry[kind]._read(f, _info_from_attrs(f))
    except OSError as exc:
        raise DataError(f"cannot read Fisher file {path}: {str(exc).splitlines()[0]}") from None
    except KeyError as exc:
        raise DataError(f"{path}: malformed Fisher file (missing {exc})") from None
    except (json.JSONDecodeError, ValueError, TypeError) as exc:
        raise DataError(f"{path}: malformed Fisher file ({str(exc).splitlines()[0]})") from None
    fisher.path = path
    check_fisher(fisher, checksum, names, shapes)
    return fisher


def check_fisher(
    fisher: FisherMatrix,
    checksum: str | None = None,
    names: list[str] | None = None,
    shapes: list[list[int]] | None = None,
) -> None:
    """Refuse a Fisher that belongs to another checkpoint or parameter layout (see :func:`load_fisher`).

    Raises:
        DataError: one line naming ``fisher.path`` (or "the Fisher") and the first difference.
    """
    where, info = str(fisher.path) if fisher.path is not None else "the Fisher", fisher.info
    recorded = info.checkpoint.get("checksum") if isinstance(info.checkpoint, dict) else None
    if checksum is not None and recorded != checksum:
        said = f"at checkpoint {recorded}" if recorded else "without a checkpoint checksum"
        raise DataError(
            f"{where} was estimated {said}, not at the expected checkpoint {checksum} (a Fisher of another model or run)"
        )
    if names is None:
        return
    P = sum(math.prod(s) for s in shapes) if shapes is not None else None
    if P is not None and fisher.P != P:
        raise DataError(f"{where} has P={fisher.P} but the model's parameter layout has P={P}")
    if info.param_names and list(info.param_names) != list(names):
        first = next((a, b) for a, b in itertools.zip_longest(info.param_names, names) if a != b)
        raise DataError(
            f"{where} is over other parameters than the model's ({first[0]!r} where the model has {first[1]!r})"
        )
    if info.param_shapes and shapes is not None and [list(s) for s in info.param_shapes] != [list(s) for s in shapes]:
        raise DataError(f"{where} records other parameter shapes than the model's (same names)")


class _MatrixFreeQuadratic(torch.autograd.Function):
    """strength/2 d^T F d as one autograd node: the value from ``quad``, the gradient strength F d from ``mv``.

    For representations whose data must not enter the autograd graph (rows streamed from disk,
    products of a model): the forward pass builds no graph, the backward pass is one product.
    """

    @staticmethod
    def forward(ctx, d: torch.Tensor, fisher: FisherMatrix, strength: float) -> torch.Tensor:  # type: ignore[override]
        ctx.fisher, ctx.strength = fisher, strength
        ctx.save_for_backward(d)
        return (0.5 * strength * fisher.quad(d.detach())).to(d.dtype)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        (d,) = ctx.saved_tensors
        return grad_out * ctx.strength * ctx.fisher.mv(d.detach()).to(d.dtype), None, None


def matrix_free_penalty(fisher: FisherMatrix, d: torch.Tensor, strength: float) -> torch.Tensor:
    """strength/2 d^T F d for d (P,), differentiable in d through one ``mv`` (see ``_MatrixFreeQuadratic``)."""
    return _MatrixFreeQuadratic.apply(d, fisher, float(strength))


def read_tensor(f: h5py.File, name: str) -> torch.Tensor:
    """The HDF5 dataset ``name`` of ``f``, read whole into a CPU tensor."""
    return torch.from_numpy(np.asarray(f[name][()]))


def write_tensor(f: h5py.File, name: str, t: torch.Tensor) -> None:
    """Write ``t`` (detached, on CPU) as the HDF5 dataset ``name`` of ``f``, with a Fletcher-32 checksum."""
    f.create_dataset(name, data=t.detach().cpu().numpy(), fletcher32=True)
