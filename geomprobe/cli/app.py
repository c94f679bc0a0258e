"""The ``geomprobe`` application: one-line errors, interrupts, threads, progress, and the shared options.

Every command module of this package registers its commands on :data:`app`. Errors a user can
cause are :class:`geomprobe.errors.GeomprobeError`; they are turned into a one-line message and an
exit code in one place, :class:`_GeomprobeGroup.invoke`.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from typer.core import TyperCommand, TyperGroup

from geomprobe.allocator import retain_freed_memory

try:  # typer >= 0.29 carries its own copy of click
    from typer._click.exceptions import ClickException as _ClickException
except ImportError:  # pragma: no cover - older typer on click
    from click.exceptions import ClickException as _ClickException
from geomprobe.errors import GeomprobeError


def _flags_without_value_type(params: list) -> list:
    """Blank the value column of flags in ``--help`` (typer 0.29 labels every option, flags too, ``<bool>``)."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""  # display_type_rich shows a metavar as given; "" shows nothing
    return params


def _is_path(param) -> bool:
    """True for a ``Path`` or ``list[Path]`` parameter."""
    from typing import get_args

    desc = param.type_descriptor
    inner = get_args(desc.annotation)[:1] if desc.is_list else ()
    return desc.is_path or any(isinstance(a, type) and issubclass(a, Path) for a in inner)


def _refuse_empty_paths(command, args: list[str]) -> None:
    """A path option or argument given as ``''`` is a UsageError (``Path('')`` would silently be the cwd)."""
    from geomprobe.errors import UsageError

    takes_value, path_options = set(), set()
    for param in command.params:
        names = [*param.opts, *getattr(param, "secondary_opts", [])]
        if param.param_type_name == "option" and not param.is_flag:
            takes_value.update(names)
            if _is_path(param):
                path_options.update(names)
    path_argument = any(p.param_type_name == "argument" and _is_path(p) for p in command.params)
    i = 0
    while i < len(args):
        token = args[i]
        name, eq, value = token.partition("=")
        if name in path_options and (value == "" if eq else i + 1 < len(args) and args[i + 1] == ""):
            raise UsageError(f"{name} is empty; give a path ('.' for the current directory)")
        if token in takes_value:
            i += 1  # skip the option's value
        elif token == "" and path_argument:
            raise UsageError("an empty path was given; give a path ('.' for the current directory)")
        i += 1


class _GeomprobeCommand(TyperCommand):
    """Every command: flags without a value type in ``--help``; empty paths refused before parsing."""

    def get_params(self, ctx):  # noqa: D102 - click API
        return _flags_without_value_type(super().get_params(ctx))

    def parse_args(self, ctx, args):  # noqa: D102 - click API
        _refuse_empty_paths(self, args)
        return super().parse_args(ctx, args)


class _GeomprobeGroup(TyperGroup):
    """Turns project errors into one line on stderr and a non-zero exit (never a traceback).

    Also the process set-up that must precede torch: OMP_WAIT_POLICY (:func:`_prepare_process`) and the
    SIGINT handler that makes Ctrl-C stop every command with exit 130 (geomprobe/io.py, "interrupts").
    """

    def main(self, *args, **kwargs):  # noqa: D401 - click API
        import signal

        previous = signal.getsignal(signal.SIGINT)
        installed = _prepare_process()
        self.interrupt_reported = False
        try:
            return super().main(*args, **kwargs)
        except SystemExit as exc:
            # typer turns a Ctrl-C outside a command (parsing, teardown) into a silent exit 130: say it here
            if exc.code == 130 and not self.interrupt_reported:
                _print_interrupt(_command_name(sys.argv[1:]), None)
            raise
        finally:
            if "torch.distributed" in sys.modules:  # never import torch just to exit
                from geomprobe.distributed import close_dist

                close_dist()  # grads / spectrum --ckpt under torchrun keep the group to the command's end
            if installed:
                signal.signal(signal.SIGINT, previous)

    def get_params(self, ctx):  # noqa: D102 - click API
        return _flags_without_value_type(super().get_params(ctx))

    def invoke(self, ctx):  # noqa: D401 - click API
        from geomprobe.io import raise_if_interrupted

        retain_freed_memory()  # fewer page faults for per-batch temporaries (geomprobe/allocator.py)
        try:
            result = super().invoke(ctx)
            raise_if_interrupted()  # a Ctrl-C swallowed by a finaliser still ends the command with 130
            return result
        except GeomprobeError as exc:
            Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except _ClickException as exc:  # an unknown option, a value of the wrong type: click's, in one line
            from rich.markup import escape

            where = getattr(exc, "ctx", None) or ctx
            message = " ".join(exc.format_message().split()).rstrip(".")
            Console(stderr=True).print(
                f"[bold red]error:[/] {escape(message)}; see {escape(where.command_path)} --help",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt as exc:  # under torchrun every rank stops; rank 0 alone says so
            _print_interrupt(ctx.invoked_subcommand or "", getattr(exc, "step", None))
            self.interrupt_reported = True
            raise typer.Exit(130) from None
        except MemoryError:  # an allocation the checks could not foresee (they refuse what cannot fit)
            Console(stderr=True).print(
                "[bold red]error:[/] out of memory; use smaller sizes (--batch-size, --samples, --n, --max-memory)",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(1) from None
        except OSError as exc:  # a full disk, a read-only or vanished directory: the system's one line
            where = f": {exc.filename}" if exc.filename else ""
            what = exc.strerror or (str(exc).splitlines() or [type(exc).__name__])[0]
            Console(stderr=True).print(f"[bold red]error:[/] {what}{where}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None


# Commands whose work survives an interrupt and that continue it only with --resume; the others
# (grads, reproduce) continue when rerun as they were, or (sample, spectrum, figures) start again.
_RESUME_FLAG = {"train", "continual"}


def _command_name(argv: list[str]) -> str:
    """The subcommand of a command line (its first word that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), "")


def _print_interrupt(name: str, step: int | None) -> None:
    """The interrupt line on stderr (rank 0 alone under torchrun)."""
    Console(stderr=True, quiet=os.environ.get("RANK", "0") != "0").print(
        _interrupt_message(name, step), highlight=False, soft_wrap=True
    )


def _interrupt_message(name: str, step: int | None) -> str:
    """One line: what was kept and the exact command that continues (the original argv, + --resume)."""
    from geomprobe.io import resume_command

    kept = f" at step {step} (checkpoint saved)" if step is not None else ""
    if name in _RESUME_FLAG:
        return f"interrupted{kept}; resume with: {resume_command(add_resume=True)}"
    if name in ("grads", "reproduce"):
        return f"interrupted{kept}; finished parts are kept, rerun to continue: {resume_command()}"
    return f"interrupted{kept}; rerun with: {resume_command()}"


def _prepare_process() -> bool:
    """Before torch loads: OpenMP threads that sleep instead of spin when idle, and the SIGINT handler.

    ``OMP_WAIT_POLICY=PASSIVE`` unless the user set it (see ``threads_option``); libgomp reads it once,
    when torch loads it, so it is set here, before any command imports torch. Returns True when the
    SIGINT handler was installed (main thread).
    """
    from geomprobe.io import install_interrupt_handler

    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return install_interrupt_handler()


class _Typer(typer.Typer):
    """``@app.command()`` builds a :class:`_GeomprobeCommand` unless told otherwise."""

    def command(self, *args, cls=None, **kwargs):  # noqa: D102 - typer API
        return super().command(*args, cls=cls or _GeomprobeCommand, **kwargs)


app = _Typer(
    cls=_GeomprobeGroup,
    help="Gradient geometry of diffusion models: per-sample gradients, Fisher spectra, rank-1 EWC.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

DEVICE_HELP = "auto (CUDA when available), cpu or cuda"


def memory_option(what: str):
    """The one ``--max-memory`` option: parsed once here into bytes (geomprobe.io.parse_memory)."""
    from geomprobe.io import DEFAULT_MAX_MEMORY, parse_memory

    return typer.Option(
        f"{DEFAULT_MAX_MEMORY // 2**30}G",
        "--max-memory",
        parser=parse_memory,
        metavar="SIZE",
        help=f"memory budget for {what}, e.g. 512M or 4G",
    )


MAX_THREADS = 4096
"""The most ``--threads`` accepted (torch takes a C int; more threads than this is a typo)."""


def default_threads() -> int:
    """Torch/OpenMP threads without ``--threads``: ``OMP_NUM_THREADS`` when set, else the usable cores.

    Usable cores: the CPUs this process may run on (``os.sched_getaffinity``), i.e. a fixed number per
    machine, never the current load (results must not depend on what else runs). With the threads
    sleeping when idle (``OMP_WAIT_POLICY=PASSIVE``, set by the CLI) this does not collapse when other
    jobs share the cores; README "Threads" has the measurements.
    """
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if env.isdigit() and 0 < int(env) <= MAX_THREADS:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _apply_threads(value: int | None) -> int | None:
    """``--threads`` callback: runs while the options are parsed, before the command imports torch."""
    if value is not None:
        from geomprobe.io import check_count

        check_count(value, "--threads", 1, MAX_THREADS)
    n = value if value is not None else default_threads()
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(n)  # read when torch loads
    if "torch" in sys.modules:  # already loaded (library use, tests): set it directly
        sys.modules["torch"].set_num_threads(n)
    return value


def threads_option():
    """The one ``--threads`` option of every command (applied by its callback; the command ignores the value)."""
    return typer.Option(
        None,
        "--threads",
        callback=_apply_threads,
        metavar="N",
        help="torch/OpenMP threads (default: OMP_NUM_THREADS if set, else the usable CPU cores)",
    )


def console(quiet: bool = False) -> Console:
    """The stderr console (silent with ``quiet``)."""
    return Console(stderr=True, quiet=quiet)


PROGRESS_SECONDS = 30.0
"""Off a terminal, ``progress_bar`` prints a plain line at every 10% and at least every this many seconds."""


@contextmanager
def progress_bar(description: str, total: int, quiet: bool = False, unit: str = "") -> Iterator[Callable[..., None]]:
    """A rich progress bar on stderr; yields ``update(completed, **fields)``.

    The bar appears at the first update, so input errors raised before any work starts print
    as a single line. ``fields`` (e.g. ``loss=1.23``) are shown after the bar. When stderr is not a
    terminal (redirected to a file), plain lines ``description: done/total (pct%) fields, elapsed``
    are printed instead, at every 10% and every :data:`PROGRESS_SECONDS` (``GEOMPROBE_PROGRESS_SECONDS``).
    Every update is also a safe point for Ctrl-C (geomprobe/io.py, "interrupts").
    """
    import time

    from geomprobe.io import raise_if_interrupted

    con = console(quiet)
    plain = not quiet and not con.is_terminal
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    prog = Progress(*columns, console=con, disable=quiet or plain, transient=False)
    task = prog.add_task(description, total=total, info="")
    started = False
    every = float(os.environ.get("GEOMPROBE_PROGRESS_SECONDS", PROGRESS_SECONDS))
    t0 = time.monotonic()
    last = {"time": t0, "tenth": 0, "line": ""}

    def plain_line(completed: int, total: int | None, info: str) -> None:
        now = time.monotonic()
        tenth = int(10 * completed / total) if total else 0
        if tenth <= last["tenth"] and now - last["time"] < every:
            return
        last.update(time=now, tenth=max(tenth, last["tenth"]))
        pct = f" ({100 * completed / total:.0f}%)" if total else ""
        line = (
            f"{description}: {completed}/{total if total else '?'}{pct}{' ' + info if info else ''}, {now - t0:.0f} s"
        )
        last["line"] = line
        con.print(line, highlight=False, soft_wrap=True, markup=False)

    def update(completed: int, total: int | None = None, **fields: float) -> None:
        nonlocal started
        raise_if_interrupted()
        if not started:
            prog.start()
            started = True
        info = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
        info += f" {unit}" if unit and info else ""
        prog.update(task, completed=completed, total=total, info=info)
        if plain:
            plain_line(completed, prog.tasks[0].total, info)

    try:
        yield update
    finally:
        if started:
            prog.stop()


def num_train_timesteps_of(ckpt: Path) -> int:
    """The model's ``num_train_timesteps`` from ``scheduler/scheduler_config.json`` (JSON only: no torch).

    1000 (the default scheduler's) when the file is absent or unreadable; loading the model reports that.
    """
    try:
        value = json.loads((Path(ckpt) / "scheduler" / "scheduler_config.json").read_text()).get(
            "num_train_timesteps", 1000
        )
    except (OSError, ValueError, AttributeError):
        return 1000
    return value if isinstance(value, int) and value > 0 else 1000


def print_json(obj) -> None:
    """``obj`` as indented JSON on stdout."""
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


def parse_seeds(text: str) -> list[int]:
    """``--seeds`` "0,1,2" as a list of valid seeds (``check_seed``; one-line error otherwise)."""
    from geomprobe.errors import UsageError

    try:
        seeds = [int(s) for s in text.replace(" ", "").split(",") if s != ""]
    except ValueError:
        raise UsageError(f"malformed --seeds {text!r}; use e.g. '0,1,2'") from None
    if not seeds:
        raise UsageError("--seeds is empty")
    from geomprobe.io import check_seed

    return [check_seed(s, "--seeds") for s in seeds]


def mean_pm(mean: float, err: float) -> str:
    """Mean ± standard error with one decimal (the mean alone when the error is NaN)."""
    return f"{mean:.1f}" if err != err else f"{mean:.1f} ± {err:.1f}"


def _continual_config_module():
    """``geomprobe.continual.config`` without running ``geomprobe/continual/__init__.py``.

    That package imports torch and diffusers (5-20 s), and the options of ``continual`` are built from
    its config module when the CLI is imported; loading the module file alone keeps ``geomprobe --help``
    and argument errors fast. The module is registered under its own name, so later imports (the package
    itself included) share it.
    """
    import importlib.util

    name = "geomprobe.continual.config"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "continual" / "config.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def config_option(name: str, *decls: str):
    """The typer option of ContinualConfig field ``name``: its default and help text come from the dataclass."""
    f = _continual_config_module().config_field(name)
    return typer.Option(f.default, *decls, help=f.metadata["help"])
