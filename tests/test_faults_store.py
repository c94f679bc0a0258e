"""Faults of the gradient store (issue 14): edited manifests, moved or swapped shards, flipped bits,
two writers, a full disk, and kills and Ctrl-C of `grads`.

Every refusal is checked as the user sees it: a non-zero exit, one line on stderr naming the file,
no traceback. Kill trials run `python -m geomprobe grads` as a subprocess, send SIGKILL at a seeded
random point (during start-up before the first shard, or after k shards), rerun the same command
(SIGKILL prints nothing; the documented rerun is the command itself) and require the store to be
bitwise identical to an uninterrupted run: every dataset and attribute of every shard, and the
manifest without its times (and its own checksum, which covers them). 5 kill trials and 1 Ctrl-C
trial run by default, 20 more kills and 8 more Ctrl-C with ``-m faults``.
"""

from __future__ import annotations

import errno
import json
import os
import random
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from geomprobe.checkpoints import ModelInfo, checkpoint_checksum, save_checkpoint
from geomprobe.cli import app
from geomprobe.errors import DataError, UsageError
from geomprobe.lock import LOCK_NAME, DirectoryLock, directory_lock
from geomprobe.models import build_scheduler
from geomprobe.probe import ExtractConfig, GradientStore, extract_gradients
from geomprobe.probe import shards as shards_module
from geomprobe.probe.integrity import manifest_checksum, read_manifest, write_manifest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
SHARDS = 6  # 24 samples in shards of 4 rows, 2 keys
GRADS = "--t 100,700 --samples 24 --shard-rows 4 --seed 3 --device cpu --max-memory 256M --threads 1 --quiet"
runner = CliRunner()


@pytest.fixture(scope="module")
def ckpt(micro_ckpt):
    """A micro UNet checkpoint for digits at 8 px (conftest.micro_ckpt)."""
    return micro_ckpt


def _args(ckpt, out, extra: str = "") -> list[str]:
    return ["grads", "--ckpt", str(ckpt), "--out", str(out), *shlex.split(GRADS), *shlex.split(extra)]


def _config(ckpt) -> ExtractConfig:
    """The library spelling of GRADS."""
    return ExtractConfig(ckpt=str(ckpt), t_range="100,700", samples=24, shard_rows=4, seed=3)


def _command(ckpt, out) -> list[str]:
    return [sys.executable, "-m", "geomprobe", *_args(ckpt, out)]


@pytest.fixture(scope="module")
def reference(ckpt, tmp_path_factory):
    """An uninterrupted `grads` run (subprocess, one thread)."""
    out = tmp_path_factory.mktemp("reference") / "grads"
    done = subprocess.run(_command(ckpt, out), env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _stderr(result) -> str:
    return (result.stderr if result.stderr_bytes is not None else result.output).strip()


def _one_line_error(text: str, code: int, expected_code: int, needle: str) -> None:
    assert code == expected_code, text
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    assert needle in text, text


def _spectrum(store: Path, tmp_path: Path):
    return runner.invoke(
        app, ["spectrum", "--grads", str(store), "--no-model", "--quiet", "--out", str(tmp_path / "s")]
    )


# ---------------------------------------------------------------- comparing stores


def _datasets(path: Path) -> dict[str, tuple[np.ndarray, dict]]:
    items: dict[str, tuple[np.ndarray, dict]] = {"/": (np.zeros(0), {})}
    with h5py.File(path, "r") as f:
        items["/"] = (np.zeros(0), {k: np.asarray(v) for k, v in f.attrs.items()})
        f.visititems(
            lambda name, obj: (
                items.__setitem__(name, (obj[()], {k: np.asarray(v) for k, v in obj.attrs.items()}))
                if isinstance(obj, h5py.Dataset)
                else None
            )
        )
    return items


def _comparable_manifest(out: Path, command: bool) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    for name in ("created", "finished", "manifest_sha256") + (() if command else ("command",)):
        manifest.pop(name)
    if command:
        manifest["command"] = [a.replace(str(out), "OUT") for a in manifest["command"]]
    return manifest


def assert_same_store(out: Path, ref: Path, command: bool = True) -> None:
    """Bitwise: every dataset and attribute of every shard, and the manifest without its times.

    ``command=False`` for a store written in-process (its manifest records pytest's command line).
    """
    assert _comparable_manifest(out, command) == _comparable_manifest(ref, command)
    names = sorted(p.name for p in ref.glob("shard-*"))
    assert sorted(p.name for p in out.glob("shard-*")) == names
    for name in names:
        a, b = _datasets(out / name), _datasets(ref / name)
        assert a.keys() == b.keys(), name
        for key in a:
            assert a[key][0].dtype == b[key][0].dtype and np.array_equal(a[key][0], b[key][0]), (name, key)
            assert a[key][1].keys() == b[key][1].keys(), (name, key)
            for attr in a[key][1]:
                assert np.array_equal(a[key][1][attr], b[key][1][attr]), (name, key, attr)
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    leftovers = [p.name for p in out.iterdir() if ".tmp" in p.name or p.name == LOCK_NAME]
    assert not leftovers, leftovers
    GradientStore(out).verify()


# ---------------------------------------------------------------- the manifest checks itself


def _edit(manifest: dict, what: str, other: Path) -> None:
    if what == "n":
        manifest["n"] -= 1
    elif what == "snr":
        manifest["key_info"]["t700"]["snr"] *= 2
    elif what == "foreign shard":
        manifest["shards"][1]["file"] = str(other / "shard-00001.h5")
    elif what == "swapped names":
        s = manifest["shards"]
        s[0]["file"], s[1]["file"] = s[1]["file"], s[0]["file"]
    elif what == "dropped t":
        manifest["keys"].remove("t700")
    elif what == "no checksum":
        manifest.pop("manifest_sha256")
    elif what == "shards null":
        manifest["shards"] = None


EDITS = ["n", "snr", "foreign shard", "swapped names", "dropped t", "no checksum", "shards null"]


@pytest.mark.parametrize("what", EDITS)
def test_edited_manifest_is_one_line_error(reference, tmp_path, what):
    """Each edit the fault harness made (and one that gave a traceback) is refused, naming manifest.json."""
    out = _copy(reference, tmp_path / "store")
    path = out / "manifest.json"
    manifest = json.loads(path.read_text())
    _edit(manifest, what, reference)
    path.write_text(json.dumps(manifest, indent=2))
    result = _spectrum(out, tmp_path)
    _one_line_error(_stderr(result), result.exit_code, 3, str(path))
    assert not (tmp_path / "s" / "spectrum.json").exists()


def test_manifest_checksum_survives_a_rewrite_and_is_checked_on_resume(ckpt, reference, tmp_path):
    manifest = read_manifest(reference)
    assert manifest["manifest_sha256"] == manifest_checksum(json.loads(json.dumps(manifest)))
    out = _copy(reference, tmp_path / "store")
    manifest["n"] = 23
    (out / "manifest.json").write_text(json.dumps(manifest))
    result = runner.invoke(app, _args(ckpt, out))  # the grads rerun refuses it too
    _one_line_error(_stderr(result), result.exit_code, 3, str(out / "manifest.json"))
    result = runner.invoke(app, _args(ckpt, out, "--overwrite"))
    assert result.exit_code == 0, _stderr(result)
    assert_same_store(out, reference, command=False)


# ---------------------------------------------------------------- shard paths stay in the store


def _resign(out: Path, edit) -> None:
    """Edit the manifest and give it a matching checksum (what a consistent but wrong manifest looks like)."""
    manifest = read_manifest(out)
    edit(manifest)
    write_manifest(out, manifest)


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink"])
def test_shard_paths_are_confined_to_the_store(reference, tmp_path, kind):
    out = _copy(reference, tmp_path / "store")
    other = _copy(reference, tmp_path / "other")
    if kind == "absolute":
        _resign(out, lambda m: m["shards"][1].__setitem__("file", str(other / "shard-00001.h5")))
    elif kind == "dotdot":
        _resign(out, lambda m: m["shards"][1].__setitem__("file", "../other/shard-00001.h5"))
    else:
        (out / "shard-00001.h5").unlink()
        (out / "shard-00001.h5").symlink_to(other / "shard-00001.h5")
    with pytest.raises(DataError, match="shard path .*shard-00001.h5"):
        GradientStore(out)
    result = _spectrum(out, tmp_path)
    _one_line_error(_stderr(result), result.exit_code, 3, "shard-00001.h5")


def test_swapped_shard_files_are_caught_at_open(reference, tmp_path):
    """The manifest is intact; the files were renamed into each other's place."""
    out = _copy(reference, tmp_path / "store")
    (out / "shard-00000.h5").rename(out / "x")
    (out / "shard-00001.h5").rename(out / "shard-00000.h5")
    (out / "x").rename(out / "shard-00001.h5")
    with pytest.raises(DataError, match="holds rows 4..8, the manifest says 0..4"):
        GradientStore(out)
    result = _spectrum(out, tmp_path)
    _one_line_error(_stderr(result), result.exit_code, 3, str(out / "shard-00000.h5"))


def test_shard_of_another_store_with_the_same_layout_is_caught(ckpt, reference, tmp_path):
    """Same rows, keys and P, other seed: only the manifest's SHA-256 tells them apart."""
    other = tmp_path / "other"
    assert runner.invoke(app, _args(ckpt, other, "--seed 4")).exit_code == 0
    out = _copy(reference, tmp_path / "store")
    shutil.copy(other / "shard-00002.h5", out / "shard-00002.h5")
    result = _spectrum(out, tmp_path)
    _one_line_error(_stderr(result), result.exit_code, 3, str(out / "shard-00002.h5"))


# ---------------------------------------------------------------- flipped bits that spectrum used to pass


def _flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


def _offset(path: Path, where: str) -> int:
    with h5py.File(path, "r") as f:
        if where.startswith("meta/"):  # a data chunk of a dataset that spectrum does not read
            chunk = f[where].id.get_chunk_info(0)
            return chunk.byte_offset + chunk.size // 2
        value = np.float64(f["grads/t700"].attrs["snr"]).tobytes()  # an attribute: HDF5 metadata
    offset = path.read_bytes().find(value)
    assert offset > 0
    return offset


@pytest.mark.parametrize("where", ["meta/t700/loss", "meta/t100/alpha_bar", "meta/t700/x0", "attribute snr"])
def test_flipped_bit_anywhere_in_a_shard_stops_spectrum(reference, tmp_path, where):
    out = _copy(reference, tmp_path / "store")
    path = out / "shard-00003.h5"
    _flip(path, _offset(path, where))
    result = _spectrum(out, tmp_path)
    _one_line_error(_stderr(result), result.exit_code, 3, str(path))
    assert "corrupt" in _stderr(result)
    GradientStore(out, verify=False).load(100)  # what spectrum read before: no error from HDF5 itself


# ---------------------------------------------------------------- one writer at a time


HOLD = "import sys, time; from geomprobe.lock import DirectoryLock; DirectoryLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)"


def test_second_writer_is_refused_and_a_killed_owner_is_taken_over(ckpt, reference, tmp_path):
    out = tmp_path / "store"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = runner.invoke(app, _args(ckpt, out))
        _one_line_error(_stderr(result), result.exit_code, 2, f"pid {holder.pid}")
        assert str(out / LOCK_NAME) in _stderr(result)
        assert not list(out.glob("shard-*")) and not (out / "manifest.json").exists()
    finally:
        holder.kill()
        holder.wait()
    assert (out / LOCK_NAME).exists()  # left behind by the killed owner: stale
    result = runner.invoke(app, _args(ckpt, out))
    assert result.exit_code == 0, _stderr(result)
    assert f"note: took over the stale lock {out / LOCK_NAME} of pid {holder.pid} on " in _stderr(result)
    assert_same_store(out, reference, command=False)


def test_two_grads_on_one_out_never_mix(ckpt, reference, tmp_path):
    """Started together: one writes, the other is refused with one line naming the writer's pid (or, if
    it comes second, finds the store complete); the store equals an uninterrupted run's."""
    out = tmp_path / "store"
    procs = [
        subprocess.Popen(_command(ckpt, out), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    errors = [p.communicate(timeout=600)[1].strip() for p in procs]
    results = [(p.returncode, err) for p, err in zip(procs, errors, strict=True)]
    assert 0 in [code for code, _ in results], results
    for (code, err), other in zip(results, procs[::-1], strict=True):
        if code != 0:
            _one_line_error(err, code, 2, f"pid {other.pid}")
    assert_same_store(out, reference)


def test_lock_file_names_its_owner_and_is_removed_on_error(tmp_path):
    lock = DirectoryLock(tmp_path / "d")
    assert lock.acquire() is None
    owner = json.loads((tmp_path / "d" / LOCK_NAME).read_text())
    assert owner["pid"] == os.getpid() and owner["host"]
    with pytest.raises(UsageError, match=f"pid {os.getpid()} on "):
        DirectoryLock(tmp_path / "d").acquire()  # flock: a second open file of this process is refused too
    lock.release()
    assert not (tmp_path / "d" / LOCK_NAME).exists()
    with pytest.raises(RuntimeError), DirectoryLock(tmp_path / "d"):
        raise RuntimeError("boom")
    assert not (tmp_path / "d" / LOCK_NAME).exists()
    with pytest.raises(KeyboardInterrupt), directory_lock(tmp_path / "d") as held:
        assert held.path.exists()
        raise KeyboardInterrupt
    assert not (tmp_path / "d" / LOCK_NAME).exists()
    with directory_lock(tmp_path / "e", enabled=False) as held:  # a torchrun rank other than 0
        assert held is None and not (tmp_path / "e").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="not a directory"):
        DirectoryLock(tmp_path / "file").acquire()


def test_stale_lock_without_flock_is_decided_by_the_pid(tmp_path, monkeypatch):
    """Where flock is not supported, a lock of a pid that no longer runs on this host is taken over."""
    import fcntl
    import socket

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    lock = DirectoryLock(tmp_path)
    assert f"pid {dead.pid}" in lock.acquire()
    lock.release()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    with pytest.raises(UsageError, match=f"pid {os.getpid()}"):
        DirectoryLock(tmp_path).acquire()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": "another-host"}))
    with pytest.raises(UsageError, match="another-host"):
        DirectoryLock(tmp_path).acquire()


# ---------------------------------------------------------------- a full disk, a read-only directory


class _FullDisk:
    """A raw file whose writes fail with ``code`` after ``room`` bytes (a disk that fills up)."""

    def __init__(self, raw, code: int, room: int):
        self.raw, self.code, self.room = raw, code, room

    def write(self, data) -> int:
        if self.room < len(data):
            raise OSError(self.code, os.strerror(self.code))
        self.room -= len(data)
        return self.raw.write(data)

    def __getattr__(self, name):
        return getattr(self.raw, name)


def _failing(monkeypatch, after: int, code: int, where: str):
    """Make shard ``after``'s writes (``where='write'``), creation (``'create'``) or rename (``'replace'``) fail."""
    real_replace, real_init = os.replace, shards_module._ShardFile.__init__

    def replace(src, dst, *a, **k):
        if Path(dst).name == f"shard-{after:05d}.h5":
            raise OSError(code, os.strerror(code), str(dst))
        return real_replace(src, dst, *a, **k)

    def init(self, path):
        if path.name.startswith(f"shard-{after:05d}") and where == "create":
            raise OSError(code, os.strerror(code), str(path))  # a directory that became read-only
        real_init(self, path)
        if path.name.startswith(f"shard-{after:05d}") and where == "write":
            self.raw = _FullDisk(self.raw, code, room=100_000)  # HDF5 fails in the middle of the shard

    if where == "replace":
        monkeypatch.setattr(shards_module.os, "replace", replace)
    monkeypatch.setattr(shards_module._ShardFile, "__init__", init)


@pytest.mark.parametrize(
    "where, code, after",
    [("write", errno.ENOSPC, 2), ("replace", errno.ENOSPC, 3), ("create", errno.EROFS, 1), ("write", errno.EDQUOT, 0)],
)
def test_full_disk_during_grads_is_one_line_and_a_rerun_completes(
    ckpt, reference, tmp_path, monkeypatch, where, code, after
):
    out = tmp_path / "store"
    before = checkpoint_checksum(ckpt)
    with monkeypatch.context() as m:
        _failing(m, after, code, where)
        result = runner.invoke(app, _args(ckpt, out))
    _one_line_error(_stderr(result), result.exit_code, 1, os.strerror(code))
    assert str(out / f"shard-{after:05d}.h5") in _stderr(result)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"] + [f"shard-{j:05d}.h5" for j in range(after)]
    for j in range(after):  # the earlier shards are complete and untouched
        assert (out / f"shard-{j:05d}.h5").read_bytes() == (reference / f"shard-{j:05d}.h5").read_bytes()
    assert checkpoint_checksum(ckpt) == before
    result = runner.invoke(app, _args(ckpt, out))  # once there is space again
    assert result.exit_code == 0, _stderr(result)
    assert_same_store(out, reference, command=False)


def _file_size_limit(limit: int):
    def apply() -> None:  # a real failing write inside HDF5 (EFBIG), as a full disk gives ENOSPC
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_full_disk_in_a_subprocess_is_one_line_not_a_segfault(ckpt, reference, tmp_path):
    """HDF5 itself hits the limit while writing shard 0 (it used to segfault when closing the file)."""
    size = (reference / "shard-00000.h5").stat().st_size
    out = tmp_path / "store"
    done = subprocess.run(
        _command(ckpt, out),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=_file_size_limit(size // 2),
    )
    _one_line_error(done.stderr.strip(), done.returncode, 1, "File too large")
    assert str(out / "shard-00000.h5.tmp") in done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]
    done = subprocess.run(_command(ckpt, out), env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert_same_store(out, reference)


# ---------------------------------------------------------------- kills and Ctrl-C


def _shards_done(out: Path) -> int:
    return len(list(out.glob("shard-*.h5"))) if out.is_dir() else 0


def _kill_trial(ckpt, reference, tmp_path, seed: int) -> None:
    """SIGKILL at a seeded point, then the same command; the store must equal the uninterrupted one.

    Points: "start-up" (a seeded time in the first 4 s: loading, before the lock and the manifest),
    "manifest" (just after the first manifest is written, before the first shard), or after k shards.
    """
    rng = random.Random(seed)
    out = tmp_path / f"run-{seed}"
    points = ["start-up", "manifest", *range(1, SHARDS)]
    point = ["start-up", "manifest", 1, 3, 5][seed % 5] if seed < 100 else rng.choice(points)
    proc = subprocess.Popen(_command(ckpt, out), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600

    def reached() -> bool:
        if point == "manifest":
            return (out / "manifest.json").exists()
        return point == "start-up" or _shards_done(out) >= point

    if point == "start-up":
        time.sleep(rng.uniform(0.0, 4.0))
    while not reached() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(rng.uniform(0.0, 0.05))
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode in (-signal.SIGKILL, 0), err
    assert "Traceback" not in err, err
    killed_after = _shards_done(out)
    state = (
        "finished" if proc.returncode == 0 else f"{killed_after} shards, manifest {(out / 'manifest.json').exists()}"
    )
    print(f"kill trial {seed}: aimed at {point}, killed with {state}")  # shown by pytest -rP
    done = subprocess.run(_command(ckpt, out), env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert_same_store(out, reference)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_kill_grads_and_rerun_is_bitwise_identical(ckpt, reference, tmp_path, seed):
    _kill_trial(ckpt, reference, tmp_path, seed)


@pytest.mark.faults
@pytest.mark.parametrize("seed", range(100, 120))
def test_kill_grads_many(ckpt, reference, tmp_path, seed):
    _kill_trial(ckpt, reference, tmp_path, seed)


def _ctrl_c_trial(ckpt, reference, tmp_path, seed: int) -> None:
    """SIGINT after k shards plus a seeded delay: exit 130, one line with the rerun command, which completes."""
    rng = random.Random(seed)
    out = tmp_path / f"run-{seed}"
    shards = 2 if seed == 0 else rng.randrange(0, SHARDS)
    proc = subprocess.Popen(_command(ckpt, out), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while max(_shards_done(out), (out / "manifest.json").exists()) < max(shards, 1) and time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.002)
    time.sleep(rng.uniform(0.0, 0.1))
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=600)
    if proc.returncode == 0:  # finished before the signal arrived
        assert_same_store(out, reference)
        return
    _one_line_error(err.strip(), proc.returncode, 130, "interrupted; finished parts are kept, rerun to continue: ")
    assert not (out / LOCK_NAME).exists() and not list(out.glob("*.tmp"))
    rerun = shlex.split(err.strip().split("rerun to continue: ", 1)[1])
    assert rerun[rerun.index("grads") :] == _args(ckpt, out)
    done = subprocess.run(rerun, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert_same_store(out, reference)


def test_ctrl_c_grads_exits_130_and_the_printed_command_resumes(ckpt, reference, tmp_path):
    _ctrl_c_trial(ckpt, reference, tmp_path, 0)


@pytest.mark.faults
@pytest.mark.parametrize("seed", range(200, 208))
def test_ctrl_c_grads_many(ckpt, reference, tmp_path, seed):
    _ctrl_c_trial(ckpt, reference, tmp_path, seed)


def test_interrupt_inside_an_hdf5_write_is_raised_after_it(ckpt, reference, tmp_path, monkeypatch):
    """Python's own SIGINT handler can raise inside the file methods HDF5 calls (a segfault at close
    once seen); the writer raises the KeyboardInterrupt after the HDF5 call and removes the shard."""
    calls = {"n": 0}
    real = shards_module._ShardFile._write_all

    def write_all(self, view):
        calls["n"] += 1
        if calls["n"] == 78 * 2 + 40:  # 78 writes per shard: in the middle of shard 2
            raise KeyboardInterrupt
        return real(self, view)

    out = tmp_path / "store"
    with monkeypatch.context() as m:
        m.setattr(shards_module._ShardFile, "_write_all", write_all)
        with pytest.raises(KeyboardInterrupt):
            extract_gradients(_config(ckpt), out, device="cpu", max_memory="256M", command=["x"])
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name or p.name == LOCK_NAME]
    assert 0 < _shards_done(out) < SHARDS
    extract_gradients(_config(ckpt), out, device="cpu", max_memory="256M", command=["x"])
    assert_same_store(out, reference, command=False)


def test_train_and_continual_take_the_lock_of_their_out(tmp_path):
    """A second writer of a train checkpoint directory or a continual run directory is refused (one line)."""
    from geomprobe.continual.config import ContinualConfig
    from geomprobe.continual.runner import run_continual
    from geomprobe.training import TrainConfig, train

    with DirectoryLock(tmp_path / "ckpt"):
        with pytest.raises(UsageError, match="being written by another geomprobe process"):
            train(TrainConfig(model="small1", image_size=8, steps=1, batch_size=4, device="cpu"), tmp_path / "ckpt")
    with DirectoryLock(tmp_path / "cl"):
        with pytest.raises(UsageError, match="being written by another geomprobe process"):
            run_continual(ContinualConfig(model="small1", image_size=8, tasks=2, steps_per_task=1), tmp_path / "cl")
    # released: the lock file is gone and a run goes through
    result = train(TrainConfig(model="small1", image_size=8, steps=1, batch_size=4, device="cpu"), tmp_path / "ckpt")
    assert result.steps == 1 and not (tmp_path / "ckpt" / LOCK_NAME).exists()


def test_a_reader_leaves_a_live_trainers_staging_alone(tmp_path, tiny_unet):
    """load_model on a checkpoint directory whose trainer holds the lock reads the committed checkpoint
    and neither rolls forward nor deletes the staging area the trainer is writing; without a live
    lock holder it finishes the staging as before."""
    import shutil

    from geomprobe.checkpoints import STAGING, load_model

    ck = tmp_path / "ck"
    save_checkpoint(ck, tiny_unet, build_scheduler(), ModelInfo("small1", "digits", 8, 1, 10, seed=0, step=1))
    shutil.copytree(ck / "unet", ck / STAGING / "unet")  # an uncommitted checkpoint in progress
    with DirectoryLock(ck):
        load_model(ck, "cpu")
        assert (ck / STAGING / "unet").is_dir()
    load_model(ck, "cpu")  # no live writer: the uncommitted staging area is dropped
    assert not (ck / STAGING).exists()
    # the first checkpoint still being written: one line, nothing touched
    first = tmp_path / "first"
    (first / STAGING).mkdir(parents=True)
    shutil.copy(ck / "geomprobe.json", first / STAGING / "geomprobe.json")
    with DirectoryLock(first), pytest.raises(DataError, match="still being written"):
        load_model(first, "cpu")
    assert (first / STAGING / "geomprobe.json").is_file()
