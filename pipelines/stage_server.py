"""A warm stage server: the five stage processes of a version without five torch imports.

Each DVC stage is its own process (``python -m pipelines.stages ...``), and most of its start-up is
imports: torch alone takes about 3 s here, the engine, the plugins and MLflow more. ``xai worker``
starts this server once (``python -m pipelines.stage_server --socket PATH``); it imports those
modules, runs no torch operation and starts no thread, and then forks one child per stage:

    client    ``python -m pipelines.stages`` with ``XAI_STAGE_SERVER`` set imports nothing heavy
              (:func:`forward`): it sends its arguments, working folder, environment, umask and
              ``sys.path`` with its stdin/stdout/stderr (``SCM_RIGHTS``) over the Unix socket, waits,
              and exits with the stage's status (128 + N when signal N killed it)
    supervisor  a fork of the server per connection: checks the peer's user id (``SO_PEERCRED``)
              and that the client runs the same interpreter on the same sources (else it refuses
              and the client runs the stage itself), forks the runner and waits for whichever comes
              first: the runner's exit (its status goes back; what it left in its process group is
              killed) or the client's end (the client was killed, say by DVC: the runner's whole
              process group is killed)
    runner    a fork of the supervisor in a new session: the client's file descriptors, folder,
              environment and path, default signal handlers, then ``pipelines.stages.main(argv)``

Every child dies with its parent (``PR_SET_PDEATHSIG``), the server with the worker that started
it. The socket lives in a private (0700) temporary folder. A client that cannot reach the server
prints one note and runs the stage in its own process: the server only saves time, and nothing a
stage writes depends on where it ran (tests/test_stage_server.py compares the outputs).

Plugins are discovered in the runner, on the client's ``sys.path`` (only the built-in modules are
imported ahead); environment variables read at import time by a library imported ahead (torch's
thread settings, say) are the worker's.
"""

from __future__ import annotations

import argparse
import atexit
import io
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ENV = "XAI_STAGE_SERVER"
READY = "ready"
HEADER = struct.Struct("!I")
MAX_REQUEST = 4 << 20  # bytes: an environment and a path, never more
# imported ahead; each runner starts with them in memory (no torch operation runs before a fork)
PRELOAD = (
    "numpy",
    "yaml",
    "torch",
    "torch.fx.experimental.symbolic_shapes",  # the first autograd.grad imports it (and sympy)
    "torchvision",
    "multiprocessing",
    "importlib_metadata",
    "scipy.ndimage",
    "scipy.optimize",
    "scipy.stats",
    "matplotlib.figure",
    "matplotlib.backends.backend_agg",
    "PIL.Image",
    "core.engine",
    "core.workflow",
    "core.policy",
    "core.cli",
    "pipelines.stages",
    "pipelines.store",
    "pipelines.probe",
    "pipelines.resolved",
    "pipelines.device",
    "pipelines.plugin",  # (not registry.plugin: pipelines imports nothing of registry)
    "mlflow",
    # not ray: its C++ side caches the cluster's authentication token once loaded, so a runner
    # forked from a server that imported ray before the cluster started could not join it
)


# -- client ----------------------------------------------------------------------------------
def forward(argv: list[str], run_here: Callable[[list[str]], int]) -> int:
    """Run stage ``argv`` in the server named by ``XAI_STAGE_SERVER`` and return its exit status;
    with no server set, or none reachable, or a refusal, ``run_here(argv)`` in this process."""
    path = os.environ.get(ENV)
    if not path:
        return run_here(argv)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(path)
            _send_request(conn, _request(argv), _standard_fds())
            reply = conn.makefile("rb").readline().decode(errors="replace").strip()
    except OSError as exc:
        return _run_here(argv, run_here, f"unreachable ({exc.strerror or exc})")
    word, _, value = reply.partition(" ")
    if word == "exit" and value.lstrip("-").isdigit():
        return int(value)
    if word == "signal" and value.isdigit():
        print(f"error: the stage was killed by signal {value}", file=sys.stderr)
        return 128 + int(value)
    if word == "refused":
        return _run_here(argv, run_here, f"refused: {value}")
    print("error: the stage server ended the stage without a status", file=sys.stderr)
    return 1


def _run_here(argv: list[str], run_here: Callable[[list[str]], int], why: str) -> int:
    print(f"note: stage server {why}; running the stage in this process", file=sys.stderr)
    return run_here(argv)


def _request(argv: list[str]) -> dict:
    umask = os.umask(0)
    os.umask(umask)
    return {
        "argv": list(argv),
        "cwd": os.getcwd(),
        "env": {k: v for k, v in os.environ.items() if k != ENV},
        "path": list(sys.path),
        "umask": umask,
        "interpreter": _interpreter(),
        "sources": _sources(),
    }


def _interpreter() -> str:
    """The Python this process runs and its environment (a venv shares the base's executable)."""
    return f"{os.path.realpath(sys.executable)} {sys.prefix}"


def _sources() -> str:
    """The folder this project's code is imported from (client and server must agree)."""
    return str(Path(__file__).resolve().parent.parent)


def _standard_fds() -> list[int]:
    """fds 0, 1, 2; a closed one is sent as /dev/null."""
    fds = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:
            fds.append(os.open(os.devnull, os.O_RDWR))
    return fds


def _send_request(conn: socket.socket, request: dict, fds: list[int]) -> None:
    data = json.dumps(request).encode()
    socket.send_fds(conn, [HEADER.pack(len(data))], fds)
    conn.sendall(data)


# -- server ----------------------------------------------------------------------------------
def serve(path: str, ready: Callable[[], None] = lambda: None) -> None:
    """Import ahead, listen on ``path``, fork a supervisor per connection; never returns."""
    for name in PRELOAD:
        try:
            __import__(name)
        except ImportError:  # an optional library (mlflow in a slim install): imported per stage
            pass
    from core.plugins import BUILTIN_PLUGINS
    from pipelines.procgroup import die_with_parent

    for name in BUILTIN_PLUGINS:
        __import__(name)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o600)
    listener.listen(64)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # supervisors are reaped by the kernel
    ready()
    with_server = die_with_parent(os.getpid(), signal.SIGKILL)  # each supervisor's first call
    while True:
        try:
            conn, _ = listener.accept()
        except InterruptedError:
            continue
        if os.fork() == 0:
            listener.close()
            code = 1
            try:
                with_server()
                code = _supervise(conn)
            except BaseException:  # noqa: BLE001 - reported on the server's stderr (the worker's)
                traceback.print_exc()
            finally:
                os._exit(code)
        conn.close()


def _supervise(conn: socket.socket) -> int:
    """One stage: check and read the request, fork the runner, wait for it or for the client."""
    from pipelines.procgroup import die_with_parent

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    pid_uid_gid = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    if struct.unpack("3i", pid_uid_gid)[1] != os.getuid():
        return 1  # another user's process: no answer at all
    conn.settimeout(10.0)
    try:
        request, fds = _read_request(conn)
    except (OSError, ValueError) as exc:
        _reply(conn, f"refused unreadable request ({exc})")
        return 1
    reason = _refusal(request, fds)
    if reason:
        _reply(conn, f"refused {reason}")
        return 0
    conn.settimeout(None)
    with_supervisor = die_with_parent(os.getpid(), signal.SIGKILL)
    runner = os.fork()
    if runner == 0:
        conn.close()
        _run_stage(request, fds, with_supervisor)
    for fd in fds:
        os.close(fd)
    status = _wait(runner, conn)
    if status is not None:
        code = os.waitstatus_to_exitcode(status)
        _reply(conn, f"exit {code}" if code >= 0 else f"signal {-code}")
    return 0


def _read_request(conn: socket.socket) -> tuple[dict, list[int]]:
    head, fds, _, _ = socket.recv_fds(conn, HEADER.size, 3)
    head += _read_exactly(conn, HEADER.size - len(head))
    (size,) = HEADER.unpack(head)
    if size > MAX_REQUEST:
        raise ValueError(f"{size} bytes")
    request = json.loads(_read_exactly(conn, size))
    if not isinstance(request, dict):
        raise ValueError("not an object")
    return request, list(fds)


def _read_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ValueError("the client closed the connection mid-request")
        data += chunk
    return data


def _refusal(request: dict, fds: list[int]) -> str | None:
    """Why this server cannot run the request as the client would (None: it can)."""
    if len(fds) != 3:
        return f"{len(fds)} file descriptors, not 3"
    checks = {
        "argv": list,
        "cwd": str,
        "env": dict,
        "path": list,
        "umask": int,
        "interpreter": str,
        "sources": str,
    }
    bad = [k for k, kind in checks.items() if not isinstance(request.get(k), kind)]
    if bad:
        return f"malformed request ({', '.join(bad)})"
    if request["interpreter"] != _interpreter():
        return f"another interpreter ({request['interpreter']}, the server runs {_interpreter()})"
    if request["sources"] != _sources():
        return f"other sources ({request['sources']}, the server runs {_sources()})"
    return None


def _wait(runner: int, conn: socket.socket) -> int | None:
    """The runner's wait status; None when the client went away first (the runner is killed)."""
    pidfd = os.pidfd_open(runner)
    try:
        while True:
            readable, _, _ = select.select([pidfd, conn], [], [])
            if pidfd in readable:
                _, status = os.waitpid(runner, 0)
                _kill_group(runner)  # whatever the stage left running in its session
                return status
            if conn in readable:  # the client's end: EOF (it sends nothing after the request)
                _kill_group(runner)
                os.waitpid(runner, 0)
                return None
    finally:
        os.close(pidfd)


def _kill_group(pid: int) -> None:
    for kill in (os.killpg, os.kill):  # the group; the runner itself if it had no session yet
        try:
            kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _reply(conn: socket.socket, line: str) -> None:
    try:
        conn.sendall(line.encode() + b"\n")
    except OSError:
        pass


def _run_stage(request: dict, fds: list[int], die_with_supervisor: Callable[[], None]) -> None:
    """The runner: become the client's process, run the stage, exit with its status."""
    os.setsid()
    die_with_supervisor()
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in fds:
        if fd > 2:
            os.close(fd)
    code = 1
    try:
        os.chdir(request["cwd"])
        os.umask(request["umask"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.path[:] = request["path"]
        sys.argv = ["python -m pipelines.stages", *request["argv"]]
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _reopen_standard_streams()
        from pipelines.stages import main

        code = main(request["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - the stage's own error handling did not catch it
        traceback.print_exc()
    finally:
        try:
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _reopen_standard_streams() -> None:
    """sys.stdin/stdout/stderr on the client's descriptors, buffered as Python would for them."""
    sys.stdin = io.TextIOWrapper(open(0, "rb", closefd=False))
    sys.stdout = io.TextIOWrapper(open(1, "wb", closefd=False), line_buffering=os.isatty(1))
    sys.stderr = io.TextIOWrapper(
        open(2, "wb", closefd=False), line_buffering=True, errors="backslashreplace"
    )


# -- starting one ------------------------------------------------------------------------------
class StageServer:
    """A server being started (:func:`start`). ``wait()`` gives the environment that points the
    stages at it once it listens (or an empty one if it never came up: the stages start cold);
    ``close()`` stops it. It dies with the process that started it."""

    def __init__(self, process: subprocess.Popen, folder: str, timeout: float):
        self.process, self.folder, self.timeout = process, folder, timeout
        self.error: str | None = None
        self._env: dict[str, str] | None = None
        atexit.register(self.close)

    def wait(self) -> dict[str, str]:
        """``{XAI_STAGE_SERVER: socket}`` once the server listens; {} (and ``error`` says why)
        if it exited or did not come up within the time-out."""
        if self._env is None:
            self._env = {ENV: os.path.join(self.folder, "socket")} if self._ready() else {}
        return self._env

    @property
    def env(self) -> dict[str, str]:
        return self.wait()

    def _ready(self) -> bool:
        assert self.process.stdout is not None
        deadline, line = time.monotonic() + self.timeout, b""
        while not line and time.monotonic() < deadline and self.process.poll() is None:
            if select.select([self.process.stdout], [], [], 0.5)[0]:
                line = self.process.stdout.readline()
        self.process.stdout.close()
        if line.strip() == READY.encode():
            return True
        self.error = (
            f"it exited with status {self.process.returncode}"
            if self.process.poll() is not None
            else f"it did not listen within {self.timeout:.0f} s"
        )
        self.close()
        return False

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> StageServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start(env: dict[str, str] | None = None, timeout: float = 120.0, wait: bool = True) -> StageServer:
    """Start a server (``env`` on top of this process's environment); with ``wait``, return once
    it listens and raise RuntimeError if it does not within ``timeout`` seconds. Without, it
    imports ahead while the caller goes on (``StageServer.wait()`` before the first stage)."""
    from pipelines.procgroup import die_with_parent

    folder = tempfile.mkdtemp(prefix="xai-stages-")  # 0700: only this user can reach the socket
    process = subprocess.Popen(
        [sys.executable, "-m", "pipelines.stage_server", "--socket", os.path.join(folder, "socket")],
        env={**os.environ, **(env or {}), "PYTHONPATH": _pythonpath()},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        preexec_fn=die_with_parent(os.getpid()),
    )
    server = StageServer(process, folder, timeout)
    if wait and not server.wait():
        raise RuntimeError(f"the stage server did not start: {server.error}")
    return server


def _pythonpath() -> str:
    """This project's sources first, then the caller's PYTHONPATH (the server imports them)."""
    rest = os.environ.get("PYTHONPATH", "")
    return os.pathsep.join(p for p in (_sources(), rest) if p)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.stage_server", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--socket", required=True, help="path of the Unix socket to listen on")
    args = parser.parse_args(argv)

    def ready() -> None:
        print(READY, flush=True)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)  # the starter stops reading after the one line
        os.close(devnull)

    serve(args.socket, ready)
    return 0


if __name__ == "__main__":
    sys.exit(main())
