"""The shipped gunicorn config with one thing taken out, for the hit bench to measure what
that thing costs or earns, side by side with the shipped config in the same run.

Each variant is a config file written into the bench's temporary directory: it runs
``deploy/gunicorn.conf.py`` (so every setting and hook stays the shipped one) and then
changes one thing. Nothing here is a setting of the product.
"""

from __future__ import annotations

from pathlib import Path

from .procs import SHIPPED_CONFIG

_PREAMBLE = f'''# Written by python -m bench.throughput: {SHIPPED_CONFIG.name}, then one change.
import runpy as _runpy

globals().update({{k: v for k, v in _runpy.run_path({str(SHIPPED_CONFIG)!r}).items()
                   if not k.startswith("__")}})
'''

_NO_ACCEPTOR = '''

def post_worker_init(worker):
    # The shipped hook, without the batch accepting and the board: gunicorn's gevent
    # worker accepts as it decides (one connection per turn with several workers).
    from service.gunicorn import acceptor
    from service.worker import post_worker_init as start

    acceptor.accept_in_batches = lambda worker: None
    start(worker)
'''

#: name: (what changes, the config text after the preamble).
VARIANTS: dict[str, tuple[str, str]] = {
    "no fair turn": ("no `post_request` hook", "\ndel post_request\n"),
    "no access log": ("`accesslog = None`", "\naccesslog = None\n"),
    "no acceptor": ("gunicorn's own accept, one shared listener", _NO_ACCEPTOR),
    "reuse_port": ("gunicorn's own accept, `reuse_port = True`",
                   _NO_ACCEPTOR + "\nreuse_port = True\n"),
    "reuse_port, 250": ("gunicorn's own accept, `reuse_port = True`, "
                        "`worker_connections = 250`",
                        _NO_ACCEPTOR + "\nreuse_port = True\nworker_connections = 250\n"),
}


_NO_MONITOR = '''

def post_worker_init(worker):
    # The shipped hook, without the blocked-hub monitor.
    from service.observe import monitor
    from service.worker import post_worker_init as start

    monitor.start = lambda threshold: None
    start(worker)
'''

_GEVENTS_MONITOR = '''

def post_worker_init(worker):
    # The shipped hook, with gevent's own monitor thread (a greenlet trace function called
    # on every switch) in place of the hub's beat: what the service used before.
    import gevent
    import gevent.events
    from service.observe import monitor
    from service.worker import post_worker_init as start

    def gevents(threshold):
        gevent.config.monitor_thread = True
        gevent.config.max_blocking_time = threshold
        gevent.config.print_blocking_reports = False
        gevent.events.subscribers.append(monitor.on_event)
        gevent.get_hub().start_periodic_monitoring_thread()

    monitor.start = gevents
    start(worker)
'''

_NO_LINES = '''

def post_worker_init(worker):
    # The shipped hook; the access log configured, but no line made (what the rest of
    # having an access log costs).
    from service.gunicorn.accesslog import BufferedAccessLogger
    from service.worker import post_worker_init as start

    BufferedAccessLogger.access = lambda self, resp, req, environ, request_time: None
    start(worker)
'''

_TURN_AFTER = '''

def post_worker_init(worker):
    # The shipped hook; a connection may answer {n} times in one iteration of the loop
    # before it waits for the next one (the shipped bound: 8).
    from service.gunicorn import worker as turns
    from service.worker import post_worker_init as start

    turns.BACK_TO_BACK = {n}
    start(worker)
'''


_TWO_SENDS = '''

def post_worker_init(worker):
    # The shipped hook, gunicorn's response as it is: the head in one sendall, the body
    # in another.
    from service.gunicorn import onesend
    from service.worker import post_worker_init as start

    onesend.install = lambda: None
    start(worker)
'''


#: Variants only the focused A/B (``python -m bench.ab``) runs.
AB_ONLY: dict[str, tuple[str, str]] = {
    "no hub monitor": ("no blocked-hub monitor", _NO_MONITOR),
    "gevent's hub monitor": ("gevent's monitor thread in place of the hub's beat",
                             _GEVENTS_MONITOR),
    "access log, no line made": ("`BufferedAccessLogger.access` does nothing", _NO_LINES),
    "no access log, no fair turn": ("`accesslog = None`, no `post_request` hook",
                                    "\naccesslog = None\ndel post_request\n"),
    "no access log, no fair turn, no hub monitor": (
        "`accesslog = None`, no `post_request` hook, no blocked-hub monitor",
        _NO_MONITOR + "\naccesslog = None\ndel post_request\n"),
    "two sends": ("gunicorn's head and body in two `sendall`s", _TWO_SENDS),
    "settings only": ("the shipped settings without any hook or access log",
                      "\naccesslog = None\ndel post_request, post_worker_init, worker_exit\n"),
    # The fair turn's bound, without an access log (bench/findings.md: its A/Bs).
    **{f"no access log, turn after {n}": (
        f"`accesslog = None`, a turn after {n} back-to-back answer(s)",
        _TURN_AFTER.format(n=n) + "\naccesslog = None\n") for n in (1, 4, 8, 16, 32)},
}


def write_config(directory: Path, name: str) -> Path:
    """The config file of variant ``name``, written in ``directory``."""
    path = directory / "gunicorn.conf.py"
    path.write_text(_PREAMBLE + {**VARIANTS, **AB_ONLY}[name][1], encoding="utf-8")
    return path
