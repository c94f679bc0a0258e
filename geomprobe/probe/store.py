"""The HDF5 gradient store (docs/design.md §5): writer pieces and the :class:`GradientStore` reader.

A store is a directory::

    manifest.json        tool version, command line, seed, config, checkpoint checksum, created
                         time, keys, P, parameter layout and the shards with their row ranges,
                         sizes and SHA-256 checksums; ``manifest_sha256``, its own checksum
    geomprobe.lock       only while ``grads`` writes the store (:mod:`geomprobe.lock`)
    shard-00000.h5       rows [0, shard_rows) of every key
    shard-00001.h5       rows [shard_rows, 2 shard_rows) ...

A *key* names one set of rows: ``t700`` for a fixed timestep, ``band-low-snr`` for a band, where
each row has its own t. Per shard and key::

    grads/{key}              float32 or float16 [n, P], chunked by rows, fletcher32
    meta/{key}/labels        int64 [n]
    meta/{key}/sample_index  int64 [n]   row index in the dataset split
    meta/{key}/loss          float32 [n] per-sample loss at the stored parameters
    meta/{key}/t             int64 [n]   the timestep of each row
    meta/{key}/alpha_bar     float64 [n]
    meta/{key}/x0, noise     float32 [n, C, H, W]  (the inputs: every row is reproducible)
    meta/{key}/xi            float32 [n, C, H, W]  only for target=true

Attributes of ``grads/{key}``: ``t`` (int, or the band name), ``alpha_bar`` and ``snr`` (for a band:
their means over the band's timesteps), ``key``. File attributes: ``target``, ``param_names``,
``param_shapes``, ``param_slices``, ``projection``, ``checkpoint`` (JSON), ``row_start``,
``row_stop``, ``shard`` (the index), ``complete``.

Shards are written to ``shard-NNNNN.h5.tmp`` and renamed when complete (:class:`ShardWriter`); a
failed write (a full disk) removes the temporary and raises the system's ``OSError``. The reader
checks the manifest, each shard's header and each shard's SHA-256 (:mod:`geomprobe.probe.integrity`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from geomprobe.errors import DataError, UsageError
from geomprobe.io import MANIFEST
from geomprobe.probe.integrity import (  # noqa: F401 - re-exported: the store's checks and manifest helpers
    FORMAT_VERSION,
    H5_ERRORS,
    STORE_KIND,
    check_manifest,
    check_shard,
    file_sha256,
    read_manifest,
    shard_path,
    write_manifest,
)
from geomprobe.probe.shards import TARGET_CHUNK_BYTES, ShardWriter  # noqa: F401 - re-exported: the shard writer


def shard_name(index: int) -> str:
    """The file name of shard ``index`` (``3 -> 'shard-00003.h5'``)."""
    return f"shard-{index:05d}.h5"


def key_for(t: int | str) -> str:
    """The store key of a timestep (``700 -> 't700'``) or band (``'low-snr' -> 'band-low-snr'``)."""
    if isinstance(t, (int, np.integer)):
        return f"t{int(t)}"
    text = str(t)
    if text.isdigit():
        return f"t{text}"
    if text.startswith("t") and text[1:].isdigit():
        return text
    if text.startswith("band-"):
        return text
    return f"band-{text}"


def key_label(key: str) -> int | str:
    """Inverse of :func:`key_for` for listing: ``'t700' -> 700``, ``'band-low-snr'`` unchanged."""
    return int(key[1:]) if key.startswith("t") and key[1:].isdigit() else key


class GradientStore:
    """Reader of a gradient store directory (see the module docstring for the layout).

    Keys and timesteps: :attr:`timesteps` lists one entry per key, an ``int`` t for fixed-timestep
    rows (key ``t700`` -> ``700``) and the band label ``'band-low-snr'`` for band rows. Every method
    taking ``t`` accepts ``700``, ``'700'``, ``'t700'``, ``'band-low-snr'`` or ``'low-snr'``.

    Arrays come back as CPU torch tensors: gradient rows float32 (B, P) (float16 stores are upcast),
    labels/sample_index/t int64 (n,), loss float32 (n,). Memory: :meth:`iter_blocks` holds one
    block; :meth:`load` holds the whole (n, P) matrix (small stores only).

    Verification (``verify=True``, the default): the manifest's own checksum and fields are checked
    when the store is opened (:mod:`geomprobe.probe.manifest`), and every shard's header (rows, index,
    keys, shapes) against the manifest; before the first read from a shard its SHA-256 is compared
    with the manifest's, so a changed byte anywhere in a shard (data, metadata, attributes) is a
    :class:`DataError` naming the file. Cost: one extra read of each shard that is used (see
    bench/README.md). ``verify=False`` skips the header and checksum checks (not the manifest's own).
    :meth:`verify` checks all shards at once.

    Raises:
        DataError: the store is missing, incomplete, edited or corrupt (one line naming the file).
    """

    def __init__(self, path: str | Path, verify: bool = True):
        self.path = Path(path)
        if not self.path.is_dir():
            raise DataError(f"gradient store not found: {self.path}")
        manifest = read_manifest(self.path)
        if manifest is None:
            raise DataError(f"not a gradient store (no {MANIFEST}): {self.path}")
        if not manifest.get("complete", False):
            raise DataError(f"gradient store {self.path} is incomplete; rerun the same grads command to finish it")
        check_manifest(self.path, manifest)
        self.manifest: dict[str, Any] = manifest
        self._keys: list[str] = list(manifest["keys"])
        self._shards: list[dict[str, Any]] = list(manifest["shards"])
        self._verify = verify
        self._verified: set[str] = set()
        for j, s in enumerate(self._shards):
            path = shard_path(self.path, s["file"])
            if not path.is_file():
                raise DataError(f"gradient store {self.path}: shard {s['file']} is missing")
            if verify:
                check_shard(path, self._expected(s, j), header_only=True)

    def _expected(self, shard: dict[str, Any], index: int) -> dict[str, Any]:
        """What :func:`check_shard` compares a shard with: its rows, index, keys and P from the manifest."""
        expected = {"row_start": shard["rows"][0], "row_stop": shard["rows"][1], "keys": self._keys, "P": self.P}
        if self.manifest.get("format_version", 1) >= 2:
            expected["shard"] = index
        return expected

    # ---- description

    @property
    def timesteps(self) -> list[int | str]:
        """One entry per key: int t (``t700`` -> 700) or the band label (``'band-low-snr'``)."""
        return [key_label(k) for k in self._keys]

    @property
    def keys(self) -> list[str]:
        """The raw keys (``'t700'``, ``'band-low-snr'``)."""
        return list(self._keys)

    @property
    def P(self) -> int:
        """Row length: number of selected parameters, or K for a projected store."""
        return int(self.manifest["P"])

    @property
    def param_names(self) -> list[str]:
        return list(self.manifest["params"]["names"])

    @property
    def param_shapes(self) -> list[tuple[int, ...]]:
        return [tuple(s) for s in self.manifest["params"]["shapes"]]

    @property
    def param_slices(self) -> list[tuple[int, int]]:
        return [tuple(s) for s in self.manifest["params"]["slices"]]

    @property
    def projection(self) -> dict[str, Any] | None:
        """``None`` or ``{"kind": "gaussian", "seed", "K", "P", "block"}``."""
        return self.manifest.get("projection")

    @property
    def checkpoint(self) -> dict[str, Any]:
        """``{"path": ..., "checksum": ...}`` of the model the rows came from."""
        return dict(self.manifest["checkpoint"])

    @property
    def target(self) -> str:
        return str(self.manifest["config"]["target"])

    def key(self, t: int | str) -> str:
        k = key_for(t)
        if k not in self._keys:
            raise UsageError(f"store {self.path} has no rows for {t!r}; it has {', '.join(map(str, self.timesteps))}")
        return k

    def n(self, t: int | str) -> int:
        """Number of rows at ``t``."""
        self.key(t)
        return int(self.manifest["n"])

    def meta(self, t: int | str) -> dict[str, Any]:
        """``{"key", "t", "alpha_bar", "snr", "target", "n", "P", "projection", "dtype", "band"}``.

        For a fixed t, ``t``/``alpha_bar``/``snr`` are scalars. For a band, ``t`` is the band label,
        ``band`` the band name and ``alpha_bar``/``snr`` the means over the band's timesteps; the
        per-row values are :meth:`row_timesteps` and ``meta_array(t, 'alpha_bar')``.
        """
        k = self.key(t)
        info = dict(self.manifest["key_info"][k])
        info.update(
            key=k,
            target=self.target,
            n=self.n(t),
            P=self.P,
            projection=self.projection,
            dtype=self.manifest["config"]["dtype"],
        )
        return info

    # ---- reading

    def _open(self, shard: dict[str, Any]) -> h5py.File:
        """The shard file, opened for reading; its SHA-256 is checked before its first read (``verify``)."""
        path = shard_path(self.path, shard["file"])
        if self._verify and shard["file"] not in self._verified:
            actual = file_sha256(path)
            if actual != shard["sha256"]:
                raise DataError(f"shard {path} is corrupt (SHA-256 {actual[:12]} != manifest {shard['sha256'][:12]})")
            self._verified.add(shard["file"])
        try:
            return h5py.File(path, "r")
        except OSError as exc:
            raise DataError(f"shard {path} is corrupt or truncated: {str(exc).splitlines()[0]}") from None

    def _read(self, shard: dict[str, Any], name: str, a: int | None = None, b: int | None = None) -> np.ndarray:
        path = self.path / shard["file"]
        with self._open(shard) as f:
            try:
                ds = f[name]
                return ds[()] if a is None else ds[a:b]
            except H5_ERRORS as exc:
                raise DataError(f"shard {path}: cannot read {name}: {str(exc).splitlines()[0]}") from None

    def iter_blocks(
        self, t: int | str, rows: int = 4096, start: int = 0, stop: int | None = None
    ) -> Iterator[torch.Tensor]:
        """Yield the rows ``start:stop`` of G at ``t`` in order, as float32 blocks of at most ``rows`` rows.

        Each block is a CPU tensor (b, P); blocks never span two shards, so some are shorter.
        """
        k = self.key(t)
        if rows <= 0:
            raise UsageError(f"rows per block must be positive, got {rows}")
        n = self.n(t)
        stop = n if stop is None else min(stop, n)
        for shard in self._shards:
            s0, s1 = shard["rows"]
            a, b = max(start, s0), min(stop, s1)
            if a >= b:
                continue
            path = self.path / shard["file"]
            with self._open(shard) as f:
                ds = f[f"grads/{k}"]
                for r in range(a, b, rows):
                    e = min(b, r + rows)
                    try:
                        block = ds[r - s0 : e - s0]
                    except H5_ERRORS as exc:
                        raise DataError(f"shard {path} is corrupt: {str(exc).splitlines()[0]}") from None
                    yield torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32))

    def load(self, t: int | str) -> torch.Tensor:
        """All rows at ``t``: (n, P) float32. Holds the whole matrix; prefer :meth:`iter_blocks`."""
        blocks = list(self.iter_blocks(t))
        return torch.cat(blocks) if blocks else torch.empty(0, self.P)

    def meta_array(self, t: int | str, name: str) -> torch.Tensor:
        """``meta/{key}/{name}`` concatenated over shards.

        ``name`` is one of labels, sample_index, loss, t, alpha_bar, x0, noise, xi.
        """
        k = self.key(t)
        parts = [self._read(s, f"meta/{k}/{name}") for s in self._shards]
        return torch.from_numpy(np.concatenate(parts))

    def labels(self, t: int | str) -> torch.Tensor:
        """(n,) int64 class labels of the rows."""
        return self.meta_array(t, "labels")

    def sample_index(self, t: int | str) -> torch.Tensor:
        """(n,) int64 row indices into the dataset split."""
        return self.meta_array(t, "sample_index")

    def losses(self, t: int | str) -> torch.Tensor:
        """(n,) float32 per-sample losses."""
        return self.meta_array(t, "loss")

    def row_timesteps(self, t: int | str) -> torch.Tensor:
        """(n,) int64 timestep of every row (constant for a fixed t, drawn per row for a band)."""
        return self.meta_array(t, "t")

    def inputs(self, t: int | str, start: int = 0, stop: int | None = None):
        """The stored probe inputs of rows ``start:stop`` as a :class:`geomprobe.probe.ProbeBatch`.

        With the checkpoint, ``per_sample_grads`` on this batch reproduces the rows (for a
        target=true store, ``target`` is rebuilt from the stored xi).
        """
        from geomprobe.probe.products import ProbeBatch

        k = self.key(t)
        stop = self.n(t) if stop is None else stop
        out: dict[str, list[np.ndarray]] = {"x0": [], "noise": [], "t": [], "labels": [], "xi": []}
        with_xi = self.target == "true"
        for s in self._shards:
            s0, s1 = s["rows"]
            a, b = max(start, s0), min(stop, s1)
            if a >= b:
                continue
            for name in out:
                if name == "xi" and not with_xi:
                    continue
                out[name].append(self._read(s, f"meta/{k}/{name}", a - s0, b - s0))
        cat = {n: torch.from_numpy(np.concatenate(v)) for n, v in out.items() if v}
        return ProbeBatch(cat["x0"], cat["noise"], cat["t"], cat["labels"], cat.get("xi"))

    def param_view(self, row: torch.Tensor | np.ndarray) -> dict[str, torch.Tensor]:
        """Map a flat row (P,) back to ``{parameter name: tensor of its shape}``."""
        if self.projection:
            raise UsageError("rows of a projected store (--project) do not map back to parameters")
        row = torch.as_tensor(row)
        if row.shape != (self.P,):
            raise UsageError(f"row has shape {tuple(row.shape)}, expected ({self.P},)")
        if not len(self.param_names) == len(self.param_shapes) == len(self.param_slices):
            raise DataError(f"{self.path / MANIFEST}: parameter names, shapes and slices differ in length")
        return {
            n: row[a:b].reshape(shape)
            for n, shape, (a, b) in zip(self.param_names, self.param_shapes, self.param_slices, strict=True)
        }

    def verify(self) -> None:
        """Check every shard's SHA-256 against the manifest; raise :class:`DataError` on a mismatch."""
        for j, s in enumerate(self._shards):
            check_shard(shard_path(self.path, s["file"]), self._expected(s, j), sha256=s["sha256"])

    def __repr__(self) -> str:
        return f"GradientStore({str(self.path)!r}, keys={self.timesteps}, n={self.manifest['n']}, P={self.P})"
