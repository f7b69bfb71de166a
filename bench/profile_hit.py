"""Where the time of a hot ``/v1`` hit goes, before and after the fast path (cProfile).

In-process, without gunicorn: the service's WSGI app answers N hits of one fresh key,
once through Flask's dispatch (the fast path off: what every hit cost before issue 9) and
once through the fast path. Prints per-hit cost and the functions with the most own time.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time
from typing import Any

from werkzeug.test import EnvironBuilder

from service import create_app
from service.config import parse_settings
from service.flask.fastpath import FastPath


def _profile(app: Any, environ: dict[str, Any], n: int, top: int) -> tuple[float, str]:
    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        pass

    def run() -> None:
        for _ in range(n):
            b"".join(app(dict(environ), start_response))

    t0 = time.perf_counter()
    run()
    per_hit = (time.perf_counter() - t0) / n
    prof = cProfile.Profile()
    prof.enable()
    run()
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    lines = [ln for ln in out.getvalue().splitlines() if ln.strip()]
    table = [ln for ln in lines if "ncalls" in ln or ln.lstrip()[:1].isdigit()]
    return per_hit, "\n".join(table)


def profile_hits(memcached_address: str, n: int = 20000, top: int = 12) -> dict[str, Any]:
    settings = parse_settings({
        "cache": {"servers": [memcached_address], "key_prefix": "prof", "l1_ttl": 3600.0},
        "sources": {"const": {"kind": "python", "target": "bench.hits_app:const",
                              "max_age": 3600}}}, "<bench>")
    app = create_app(settings)
    environ = EnvironBuilder(path="/v1/const").get_environ()
    fast = app.wsgi_app
    assert isinstance(fast, FastPath)
    b"".join(app(dict(environ), lambda *a: None))  # fill the key
    result: dict[str, Any] = {}
    for name, enabled in (("before (Flask dispatch)", False), ("after (fast path)", True)):
        fast.enabled = enabled
        result[name] = _profile(app, environ, n, top)
    app.extensions["service"].pool.close()
    return result


if __name__ == "__main__":
    import sys

    for label, (per_hit, table) in profile_hits(sys.argv[1]).items():
        print(f"== {label}: {per_hit * 1e6:.0f} us per hit\n{table}\n")
