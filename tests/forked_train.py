"""`python -m flm_jax.train` runs forked from one process that has already imported flm_jax.train, for tests that
start many short runs (the kill test starts twelve): each start skips the ~6.5 s of imports a new interpreter pays
(TensorFlow, JAX, seqio, orbax), and nothing else changes. A run is a real process running the command line's
code (`cli.run_tool`), killed and signalled like one.

The server (`python -m tests.forked_train`) imports, then answers one request per line on stdin:
    {"start": [argv...], "log": PATH}  ->  PID     (the child writes its stdout and stderr to PATH)
    {"wait": PID}                      ->  STATUS  (as Popen.returncode: the exit code, or -N for signal N)
Forking is safe here because importing creates no JAX backend and no TensorFlow runtime: the child starts both.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator

from flm_jax import hugepages
from flm_jax.cli import REPO_ROOT


def _run_child(argv: list[str], out: int) -> None:
    from flm_jax import cli, train

    os.dup2(out, 1)
    os.dup2(out, 2)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # the requests are the server's
    code = 0
    try:
        cli.run_tool("train", lambda: train.main(argv))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    import flm_jax.train  # noqa: F401  (the imports every child shares)

    for line in sys.stdin:
        request = json.loads(line)
        if "start" in request:
            out = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)  # exists once the pid is sent
            pid = os.fork()
            if pid == 0:
                _run_child(request["start"], out)
            os.close(out)
            reply = pid
        else:
            _, status = os.waitpid(request["wait"], 0)
            reply = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(reply, flush=True)


class Server:
    """The test's side: start runs, read their output as it comes, wait for them."""

    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.forked_train"],
            cwd=REPO_ROOT,
            env=hugepages.environment(),  # the heap settings `python -m flm_jax.train` gives itself
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def _ask(self, request: dict) -> int:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        if not reply:
            raise RuntimeError(f"the forked_train server exited ({self.proc.wait()}); its stderr is above")
        return int(reply)

    def start(self, argv: list[str], log) -> Run:
        return Run(self, self._ask({"start": argv, "log": str(log)}), log)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


class Run:
    def __init__(self, server: Server, pid: int, log):
        self.server, self.pid, self.log = server, pid, log
        self.returncode: int | None = None

    def alive(self) -> bool:
        """Running (a child that ended is a zombie until waited for)."""
        with open(f"/proc/{self.pid}/stat") as f:
            return re.sub(r"^.*\) ", "", f.read())[0] != "Z"

    def lines(self, timeout: float = 300) -> Iterator[str]:
        """The output's lines as they are written, until the run ends."""
        deadline = time.monotonic() + timeout
        with open(self.log) as f:
            pending = ""
            while time.monotonic() < deadline:
                pending += f.read()
                *complete, pending = pending.split("\n")
                yield from (line + "\n" for line in complete)
                if not complete:
                    if not self.alive():
                        pending += f.read()
                        yield from (line + "\n" for line in pending.split("\n") if line)
                        return
                    time.sleep(0.02)
        raise TimeoutError(f"run {self.pid} still writing after {timeout} s")

    def send_signal(self, signal: int) -> None:
        os.kill(self.pid, signal)

    def wait(self) -> int:
        if self.returncode is None:
            self.returncode = self.server._ask({"wait": self.pid})
        return self.returncode


if __name__ == "__main__":
    serve()
