"""What a gradient store is checked against (docs/design.md §5): its manifest and its shards' headers and checksums.

The manifest carries ``manifest_sha256``, the SHA-256 of its canonical JSON without that field
(:func:`manifest_checksum`: keys sorted, no spaces, ASCII). :func:`write_manifest` sets it on every
write and :func:`read_manifest` refuses a manifest whose content does not match it, so an edited n,
snr, key list or shard path is a one-line :class:`DataError` naming the file instead of a silently
different result. Manifests of format 1 (written before the checksum existed) have none and are read
as they are.

:func:`check_manifest` checks what the reader relies on (keys, n, P, contiguous shard row ranges with
checksums) and :func:`shard_path` confines every shard path to the store directory.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import h5py

from geomprobe.errors import DataError
from geomprobe.io import MANIFEST, write_json

STORE_KIND = "geomprobe-gradient-store"
FORMAT_VERSION = 2
"""2: manifest_sha256 and the shard index attribute; 1: older stores (read without the checksum)."""
CHECKSUM_FIELD = "manifest_sha256"


def manifest_checksum(manifest: dict[str, Any]) -> str:
    """The hex SHA-256 of ``manifest`` without :data:`CHECKSUM_FIELD`, as canonical JSON.

    Canonical: ``json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=True)``; floats are
    written by ``repr``, which round-trips, so a read-and-rewrite keeps the checksum.
    """
    body = {k: v for k, v in manifest.items() if k != CHECKSUM_FIELD}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    """The parsed, checksum-verified manifest of the store at ``directory``; None if there is none.

    Raises:
        DataError: not JSON, not a gradient-store manifest, or its checksum does not match (names the file).
    """
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != STORE_KIND:
        raise DataError(f"{path} is not a geomprobe gradient-store manifest")
    stored = manifest.get(CHECKSUM_FIELD)
    if stored is None and manifest.get("format_version") == 1:
        return manifest  # written before manifests carried their checksum
    if stored != manifest_checksum(manifest):
        raise DataError(
            f"{path} was edited or is corrupt (its content does not match its {CHECKSUM_FIELD}); "
            "restore it, or rerun the grads command with --overwrite to rebuild the store"
        )
    return manifest


def write_manifest(directory: str | Path, manifest: dict[str, Any]) -> None:
    """Set ``manifest``'s checksum and write ``directory/manifest.json`` atomically (:func:`geomprobe.io.write_json`)."""
    manifest[CHECKSUM_FIELD] = manifest_checksum(manifest)
    write_json(Path(directory) / MANIFEST, manifest)


def shard_path(directory: str | Path, name: Any) -> Path:
    """``directory / name`` for a shard path of the manifest, confined to the store directory.

    Raises:
        DataError: ``name`` is not a non-empty relative path, contains ``..``, or resolves (through
            symlinks) outside ``directory``.
    """
    directory = Path(directory)
    where = directory / MANIFEST
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise DataError(f"{where}: shard path {name!r} is not a file inside the store")
    path = directory / name
    if not path.resolve().is_relative_to(directory.resolve()):
        raise DataError(f"{where}: shard path {name!r} resolves outside the store ({path.resolve()})")
    return path


def check_manifest(directory: str | Path, manifest: dict[str, Any]) -> None:
    """Check the fields a reader relies on; every failure is one line naming the manifest.

    Checked: ``keys`` (distinct strings, each in ``key_info``), ``n`` and ``P`` (integers), ``config``
    (``target``, ``dtype``), ``shards`` (contiguous row ranges ``[a, b)`` covering ``0..n``, confined
    paths, a ``sha256`` each when the store is complete).

    Raises:
        DataError: a field is missing or inconsistent.
    """
    where = Path(directory) / MANIFEST
    try:
        keys, n, P = manifest["keys"], manifest["n"], manifest["P"]
        if not isinstance(keys, list) or not keys or len(set(keys)) != len(keys):
            raise ValueError("keys must be a non-empty list of distinct keys")
        missing = [k for k in keys if not isinstance(k, str) or k not in manifest["key_info"]]
        if missing:
            raise ValueError(f"key {missing[0]!r} has no key_info")
        if not (isinstance(n, int) and isinstance(P, int) and n >= 0 and P > 0):
            raise ValueError(f"n={n!r} and P={P!r} must be integers")
        str(manifest["config"]["target"]), str(manifest["config"]["dtype"])
        stop = 0
        for s in manifest["shards"]:
            a, b = s["rows"]
            if not (isinstance(a, int) and isinstance(b, int) and a == stop and b > a):
                raise ValueError(f"shard {s['file']!r} has rows {s['rows']}, expected to start at {stop}")
            shard_path(directory, s["file"])
            if manifest.get("complete") and not isinstance(s.get("sha256"), str):
                raise ValueError(f"shard {s['file']!r} has no sha256")
            stop = b
        if stop != n:
            raise ValueError(f"the shards hold rows 0..{stop} but n is {n}")
    except DataError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        what = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
        raise DataError(f"{where} is malformed: {what}") from None


def file_sha256(path: str | Path) -> str:
    """The hex SHA-256 of the file at ``path``, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_header(f: h5py.File, path: Path, expected: dict[str, Any]) -> None:
    """Raise :class:`DataError` unless the open shard ``f`` holds what ``expected`` says.

    ``expected``: ``row_start``, ``row_stop``, ``keys``, ``P`` and optionally ``shard`` (its index).
    Catches shards swapped or copied from another store: rows, index and keys are the shard's own.
    """
    if not bool(f.attrs.get("complete", False)):
        raise DataError(f"shard {path} is incomplete")
    rows = (int(f.attrs["row_start"]), int(f.attrs["row_stop"]))
    if rows != (expected["row_start"], expected["row_stop"]):
        raise DataError(
            f"shard {path} holds rows {rows[0]}..{rows[1]}, the manifest says "
            f"{expected['row_start']}..{expected['row_stop']}"
        )
    if "shard" in expected and "shard" in f.attrs and int(f.attrs["shard"]) != expected["shard"]:
        raise DataError(f"shard {path} is shard {int(f.attrs['shard'])}, the manifest says {expected['shard']}")
    keys = sorted(f["grads"].keys()) if "grads" in f else []
    if keys != sorted(expected["keys"]):
        raise DataError(f"shard {path} holds keys {', '.join(keys)}, the manifest says {', '.join(expected['keys'])}")
    n = expected["row_stop"] - expected["row_start"]
    for key in expected["keys"]:
        ds = f[f"grads/{key}"]
        if ds.shape != (n, expected["P"]):
            raise DataError(f"shard {path}: grads/{key} has shape {ds.shape}, expected {(n, expected['P'])}")


# What h5py raises on damaged files besides OSError (a flipped bit in a header or an attribute)
H5_ERRORS = (OSError, KeyError, ValueError, TypeError, RuntimeError, IndexError)


def check_shard(
    path: str | Path, expected: dict[str, Any], sha256: str | None = None, header_only: bool = False
) -> None:
    """Raise :class:`DataError` unless ``path`` is a complete, uncorrupted shard matching ``expected``.

    ``expected``: ``row_start``, ``row_stop``, ``keys``, ``P`` and optionally ``shard``. With ``sha256``
    the file checksum is compared as well; without it every dataset is read, so HDF5's fletcher32
    checksums cover the data. ``header_only``: only the attributes, keys and shapes (no data read).
    """
    path = Path(path)
    if sha256 is not None and not header_only:
        actual = file_sha256(path)
        if actual != sha256:
            raise DataError(f"shard {path} is corrupt (SHA-256 {actual[:12]} != manifest {sha256[:12]})")
    try:
        with h5py.File(path, "r") as f:
            _check_header(f, path, expected)
            if sha256 is None and not header_only:
                for key in expected["keys"]:
                    ds = f[f"grads/{key}"]
                    for a in range(0, ds.shape[0], max(1, ds.chunks[0])):
                        ds[a : a + ds.chunks[0]]
                    for _name, item in f[f"meta/{key}"].items():
                        item[()]
    except DataError:
        raise
    except H5_ERRORS as exc:
        raise DataError(f"shard {path} is corrupt or truncated: {(str(exc).splitlines() or [repr(exc)])[0]}") from None
