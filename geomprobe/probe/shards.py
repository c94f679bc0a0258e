"""Writing one shard of a gradient store (docs/design.md §5, "Failed writes"): :class:`ShardWriter`.

A shard is written to ``shard-NNNNN.h5.tmp`` through :class:`_ShardFile` and renamed when complete.
HDF5 never sees a failed or interrupted write: a full disk, a read-only directory or a Ctrl-C ends
with the temporary removed and one ``OSError`` (the system's text and the file) or the
``KeyboardInterrupt``, raised between HDF5 calls.
"""

from __future__ import annotations

import errno
import io
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from geomprobe.io import deferred_interrupts, raise_if_interrupted

TARGET_CHUNK_BYTES = 1 << 20
"""Bytes per chunk of ``grads/{key}`` (whole rows; at least one row)."""


class ShardWriter:
    """Writes one shard to ``<final>.tmp`` and renames it to ``final`` on a clean exit.

    Usage::

        with ShardWriter(path, file_attrs) as w:
            w.create_key("t700", n, P, "float32", {"t": 700, ...}, sample_shape=(C, H, W), with_xi=False)
            w.write_rows("t700", a, b, grads=(b-a, P), labels=..., sample_index=..., loss=..., t=...,
                         alpha_bar=..., x0=..., noise=..., xi=None)
    """

    def __init__(self, final: str | Path, attrs: dict[str, Any]):
        self.final = Path(final)
        self.tmp = self.final.with_name(self.final.name + ".tmp")
        self.attrs = attrs
        self.file: _ShardFile | None = None
        self.f: h5py.File | None = None
        self.bytes = 0

    def __enter__(self) -> ShardWriter:
        self.tmp.unlink(missing_ok=True)
        try:
            self.file = _ShardFile(self.tmp)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(self.tmp)) from None
        try:
            with self._hdf5():
                self.f = h5py.File(self.file, "w")
                for k, v in self.attrs.items():
                    self.f.attrs[k] = v
                self.f.attrs["complete"] = False
        except BaseException:
            self._discard()
            raise
        return self

    @contextmanager
    def _hdf5(self) -> Iterator[None]:
        """Around HDF5 calls: a first Ctrl-C (under the CLI's handler) and a failed write are raised after them.

        HDF5 must not see an exception inside its own calls (see :class:`_ShardFile`).
        """
        with deferred_interrupts():
            yield
        self.file.raise_if_failed()
        raise_if_interrupted()

    def create_key(
        self,
        key: str,
        n: int,
        P: int,
        dtype: str,
        key_attrs: dict[str, Any],
        sample_shape: Sequence[int],
        with_xi: bool,
        compression: str | None = None,
    ) -> None:
        """Create ``grads/{key}`` (n, P) ``dtype`` and the ``meta/{key}/*`` datasets, all fletcher32."""
        with self._hdf5():
            self._create_key(key, n, P, dtype, key_attrs, sample_shape, with_xi, compression)

    def _create_key(self, key, n, P, dtype, key_attrs, sample_shape, with_xi, compression) -> None:
        f = self.f
        itemsize = np.dtype(dtype).itemsize
        rows_per_chunk = int(max(1, min(n, TARGET_CHUNK_BYTES // max(1, P * itemsize))))
        ds = f.create_dataset(
            f"grads/{key}",
            shape=(n, P),
            dtype=dtype,
            chunks=(rows_per_chunk, P),
            fletcher32=True,
            compression=compression,
        )
        for k, v in key_attrs.items():
            ds.attrs[k] = v
        m = f.require_group(f"meta/{key}")
        img_chunk = (max(1, min(n, 64)), *sample_shape)
        for name, dt in (
            ("labels", "int64"),
            ("sample_index", "int64"),
            ("t", "int64"),
            ("loss", "float32"),
            ("alpha_bar", "float64"),
        ):
            m.create_dataset(name, shape=(n,), dtype=dt, chunks=(max(1, n),), fletcher32=True)
        for name in ("x0", "noise") + (("xi",) if with_xi else ()):
            m.create_dataset(name, shape=(n, *sample_shape), dtype="float32", chunks=img_chunk, fletcher32=True)

    def write_rows(self, key: str, a: int, b: int, grads: np.ndarray, **meta: np.ndarray | None) -> None:
        """Write rows ``a:b`` (shard-local) of ``grads/{key}`` and of the given ``meta/{key}/*``.

        Raises:
            OSError: a write failed (no space left, read-only directory): the system's error, on the shard's file.
        """
        with self._hdf5():
            f = self.f
            f[f"grads/{key}"][a:b] = grads
            for name, value in meta.items():
                if value is not None:
                    f[f"meta/{key}/{name}"][a:b] = value
        self.bytes += grads.nbytes

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._discard()
            return
        try:
            with self._hdf5():
                self.f.attrs["complete"] = True
                self.f.close()
            self.file.close()
            os.replace(self.tmp, self.final)
        except BaseException:
            self._discard()
            raise

    def _discard(self) -> None:
        """Close and remove the temporary after a failure (a full disk, Ctrl-C); the next run rewrites it."""
        try:
            if self.f is not None and self.f.id.valid:
                with deferred_interrupts():
                    self.f.close()  # succeeds: a failed file swallows HDF5's remaining writes
        finally:
            self.file.close()
            try:
                self.tmp.unlink(missing_ok=True)
            except OSError:  # e.g. the directory became read-only: the next run replaces it
                pass


class _ShardFile(io.RawIOBase):
    """The shard's file as h5py's file object: HDF5 never sees a failed or interrupted write.

    HDF5 (2.0) segfaults when a file whose flush failed is closed (the fault harness saw exit 139 after
    hundreds of lines of h5py errors on a full disk), and a Ctrl-C raised inside these methods, which
    HDF5 calls, is such a failure too. So the first exception here (an ``OSError`` such as no space
    left, or a ``KeyboardInterrupt``) is recorded, every later write is swallowed, and the writer
    raises the recorded error between HDF5 calls (:meth:`raise_if_failed`), then closes the file
    cleanly and removes it.
    """

    def __init__(self, path: Path):
        self.path = path
        self.raw = open(path, "w+b", buffering=0)  # noqa: SIM115 - closed by close()
        self.error: BaseException | None = None

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def _guarded(self, operation, *args):
        """``operation(*args)``; an exception is recorded and the operation retried once (HDF5 needs its result)."""
        try:
            return operation(*args)
        except BaseException as exc:  # noqa: BLE001 - recorded, raised by raise_if_failed outside HDF5
            self.error = self.error or exc
            return operation(*args)

    def readinto(self, buffer) -> int:
        return self._guarded(self.raw.readinto, buffer)

    def seek(self, pos: int, whence: int = 0) -> int:
        return self._guarded(self.raw.seek, pos, whence)

    def tell(self) -> int:
        return self._guarded(self.raw.tell)

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        try:
            if self.error is None:
                self._write_all(memoryview(data).cast("B"))
                return size
        except BaseException as exc:  # noqa: BLE001 - a full disk or Ctrl-C: recorded, raised outside HDF5
            self.error = self.error or exc
        self._guarded(self.raw.seek, size, os.SEEK_CUR)
        return size

    def _write_all(self, view: memoryview) -> None:
        done = 0
        while done < len(view):
            written = self.raw.write(view[done:])
            if not written:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            done += written

    def truncate(self, size: int | None = None) -> int:
        return size if self.error is not None else self._guarded(self.raw.truncate, size)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if not self.raw.closed:
            self.raw.close()
        super().close()

    def raise_if_failed(self) -> None:
        """Raise the recorded error: an OSError with the shard's file name, or the KeyboardInterrupt."""
        error = self.error
        if isinstance(error, OSError):
            raise OSError(error.errno, error.strerror or str(error), str(self.path))
        if error is not None:
            raise error
