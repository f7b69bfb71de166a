"""A Flask developer's app, as they would write it: ``@swr.cached`` views, no logging
config of its own, no settings file. Run as a script by the tests that read what such an
app prints (``python -m tests.library_app HOST:PORT``): it serves one request, says
``ready`` and waits for a line on stdin (the test stops memcached meanwhile), then serves
a few more and exits. Or served by gunicorn with the shipped hooks
(``tests.library_app:app``, ``LIBRARY_APP_MEMCACHED=HOST:PORT``)."""

from gevent import monkey

monkey.patch_all()

import os  # noqa: E402
import sys  # noqa: E402

from flask import Flask  # noqa: E402

from service import SWR  # noqa: E402

app = Flask(__name__)
# As a script: the server is its argument; under gunicorn (``tests.library_app:app``) the
# environment says it.
app.config.update(CACHE_MEMCACHED_SERVERS=[sys.argv[1] if __name__ == "__main__"
                                           else os.environ["LIBRARY_APP_MEMCACHED"]],
                  CACHE_KEY_PREFIX=os.environ.get("LIBRARY_APP_PREFIX", "library-app"))
swr = SWR()


@app.get("/report/<int:n>")
@swr.cached(max_age=60)
def report(n: int) -> dict[str, int]:
    return {"n": n}


@app.get("/healthz")
def healthz() -> str:
    return "ok"


swr.init_app(app)

if __name__ == "__main__":
    client = app.test_client()
    print("first", client.get("/report/1").headers.get("X-Cache"), flush=True)
    print("ready", flush=True)
    sys.stdin.readline()
    for n in range(2, 6):
        response = client.get(f"/report/{n}")
        print("after", response.status_code, response.headers.get("X-Cache"), flush=True)
    print("done", flush=True)
