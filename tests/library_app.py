"""A Flask developer's app, as they would write it: ``@swr.cached`` views, no logging
config of its own, no settings file. Run as a script by the tests that read what such an
app prints (``python -m tests.library_app HOST:PORT``): it serves one request, says
``ready`` and waits for a line on stdin (the test stops memcached meanwhile), then serves
a few more and exits."""

from gevent import monkey

monkey.patch_all()

import sys  # noqa: E402

from flask import Flask  # noqa: E402

from service import SWR  # noqa: E402

app = Flask(__name__)
app.config.update(CACHE_MEMCACHED_SERVERS=[sys.argv[1]] if len(sys.argv) > 1 else [],
                  CACHE_KEY_PREFIX="library-app")
swr = SWR()


@app.get("/report/<int:n>")
@swr.cached(max_age=60)
def report(n: int) -> dict[str, int]:
    return {"n": n}


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
