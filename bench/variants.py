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


def write_config(directory: Path, name: str) -> Path:
    """The config file of variant ``name``, written in ``directory``."""
    path = directory / "gunicorn.conf.py"
    path.write_text(_PREAMBLE + VARIANTS[name][1], encoding="utf-8")
    return path
