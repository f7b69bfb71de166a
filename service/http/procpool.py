"""A small pool of niced processes for CPU-bound ``python`` sources.

Why processes: a CPU-bound function in a thread still holds the worker's GIL, so every
other request of that worker waits behind it. ``python -m bench.composite`` measures it:
with a 3 s pure-Python refresh running, the p99 of cheap cached reads of the same worker
was 72 ms with the thread executor and 20 ms with the process executor (3.6x; 834 reads
at 12 ms p99 with nothing running), on a shared 2-core machine.

Why our own pool and not ``ProcessPoolExecutor``: its management thread and
queues do not mix well with a gevent-patched worker, and it cannot kill one task that runs
too long. Here each child is a plain subprocess speaking JSON lines over its pipes, which
gevent waits on cooperatively; a task over its timeout gets its child killed and replaced.

Children are started lazily, in the worker, on first use (never at import or in the
master), at lowered CPU priority (``nice``), and stopped with the worker. A result must
be JSON-encodable; the child says so clearly when it is not.

:func:`main` is the child's loop.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import orjson

from ..errors import TaskError, TaskTimeout

log = logging.getLogger(__name__)


class _Child:
    def __init__(self, nice: int) -> None:
        self.proc = subprocess.Popen(
            # -c, not -m: running a submodule of an imported package with -m warns.
            [sys.executable, "-c", "import sys, service.http.procpool as p; sys.exit(p.main())",
             "--nice", str(nice)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None,
            start_new_session=True,  # a Ctrl-C to the terminal reaches gunicorn, not us
        )

    def call(self, target: str, kwargs: dict[str, Any], timeout: float) -> Any:
        import gevent

        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(orjson.dumps({"target": target, "kwargs": kwargs}) + b"\n")
        self.proc.stdin.flush()
        reader = gevent.spawn(self.proc.stdout.readline)
        reader.join(timeout)
        if not reader.ready():
            reader.kill(block=False)
            self.kill()  # a CPU-bound task cannot be interrupted any other way
            raise TaskTimeout(f"{target} did not finish within {timeout:g}s")
        line = reader.value if reader.successful() else b""
        if not line:
            self.kill()
            raise TaskError(f"the process running {target} died")
        answer = orjson.loads(line)
        if not answer.get("ok"):
            raise TaskError(str(answer.get("error")))
        return answer["value"]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


class ProcessPool:
    """At most ``size`` child processes per worker, started on first use.

    :param size: children (and so concurrent CPU-bound tasks) per worker.
    :param nice: niceness added to the children, so the worker's own requests win.
    """

    def __init__(self, size: int = 2, nice: int = 10) -> None:
        self.size = size
        self.nice = nice
        self._idle: list[_Child] = []
        self._slots: Any = None
        self._pid: int | None = None

    def run(self, target: str, kwargs: dict[str, Any], timeout: float) -> Any:
        """Run ``target(**kwargs)`` in a child and return its (JSON) result.

        :raises TaskError: the function raised or returned something not JSON-encodable.
        :raises TaskTimeout: it ran past ``timeout``; its child was killed.
        """
        import gevent.lock

        if self._pid != os.getpid():  # first use in this process (or after a fork)
            self._idle, self._pid = [], os.getpid()
            self._slots = gevent.lock.BoundedSemaphore(self.size)
        with self._slots:
            child = self._idle.pop() if self._idle else _Child(self.nice)
            try:
                value = child.call(target, kwargs, timeout)
            except TaskError:
                if child.alive():
                    self._idle.append(child)  # the function raised; the child is in sync
                raise
            except BaseException:
                child.kill()  # timed out, or we were interrupted mid-answer
                raise
            self._idle.append(child)
            return value

    def close(self) -> None:
        while self._idle:
            self._idle.pop().kill()


def resolve(target: str) -> Callable[..., Any]:
    """Import ``package.module:function``.

    :raises ImportError: the module or the function does not exist.
    """
    module_name, _, func_name = target.partition(":")
    module = importlib.import_module(module_name)
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ImportError(f"{module_name} has no function {func_name!r}")
    return func  # type: ignore[no-any-return]


def _serve(nice: int) -> int:
    """The child's loop: one JSON request per line in, one JSON answer per line out."""
    if nice:
        os.nice(nice)
    out = sys.stdout.buffer
    for line in sys.stdin.buffer:
        try:
            request = orjson.loads(line)
            func = resolve(request["target"])
            value = func(**request["kwargs"])
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        else:
            try:
                out.write(orjson.dumps({"ok": True, "value": value}) + b"\n")
                out.flush()
                continue
            except TypeError as exc:
                answer = {"ok": False, "error": (
                    f"{request['target']} returned a value that is not JSON-encodable"
                    f" ({type(value).__name__}): {exc}")}
        out.write(orjson.dumps(answer) + b"\n")
        out.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    """The child process's entry point (see :class:`_Child`)."""
    parser = argparse.ArgumentParser(prog="service.http.procpool")
    parser.add_argument("--nice", type=int, default=10)
    return _serve(parser.parse_args(argv).nice)
