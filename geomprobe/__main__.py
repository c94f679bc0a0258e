"""``python -m geomprobe``: the CLI, with two things that must happen before anything else is imported.

- ``OMP_WAIT_POLICY=PASSIVE`` unless set: libgomp reads it when torch loads it (README, "Threads").
- Ctrl-C while the CLI is still being imported exits at once with 130 and the command to rerun;
  the CLI replaces this handler with its own (geomprobe/io.py, "interrupts") before any work starts.
"""

import os
import signal
import sys


def _interrupted_while_starting(signum, frame) -> None:
    import shlex
    import shutil

    found = shutil.which("python")
    python = "python" if found and os.path.realpath(found) == os.path.realpath(sys.executable) else sys.executable
    args = sys.argv[1:]
    if args[:1] in (["train"], ["continual"]) and "--resume" not in args:
        args = [*args, "--resume"]
    sys.stderr.write(f"interrupted; rerun with: {shlex.join([python, '-m', 'geomprobe', *args])}\n")
    sys.stderr.flush()
    os._exit(130)


os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
signal.signal(signal.SIGINT, _interrupted_while_starting)

from geomprobe.cli import main  # noqa: E402 - after the environment and the handler above

main()
