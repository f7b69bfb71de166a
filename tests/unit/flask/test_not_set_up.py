"""A decorator used with an app that never called ``swr.init_app`` says so: which
decorator, on which function, which call is missing and how to fix it; never a bare
traceback from deep in the read path at the first request."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask

from service import SWR
from service.errors import NotSetUp


def forgetful_app() -> tuple[Flask, Any, Any]:
    app = Flask("forgetful")
    swr = SWR()  # and no swr.init_app(app)

    @app.get("/report")
    @swr.cached(max_age=60)
    def report() -> str:
        return "expensive"

    @swr.memoize(max_age=60)
    def square(x: int) -> int:
        return x * x

    return app, swr, square


def test_a_cached_view_names_itself_and_the_missing_call() -> None:
    app, _swr, _square = forgetful_app()
    app.testing = True  # the exception reaches the test instead of becoming a 500 page
    with pytest.raises(NotSetUp) as caught:
        app.test_client().get("/report")
    message = str(caught.value)
    assert "@swr.cached on tests.unit.flask.test_not_set_up." in message
    assert "forgetful_app.<locals>.report" in message
    assert "Flask app 'forgetful'" in message and "swr.init_app(app)" in message


def test_a_memoized_function_says_it_too_inside_and_outside_an_app_context() -> None:
    app, _swr, square = forgetful_app()
    with pytest.raises(NotSetUp, match=r"@swr.memoize on .*square is used with no Flask "
                                       r"app.*call swr.init_app\(app\)"):
        square(3)
    with app.app_context(), pytest.raises(NotSetUp, match="Flask app 'forgetful'"):
        square(3)


def test_it_is_still_the_runtime_error_callers_caught_before() -> None:
    _app, swr, _square = forgetful_app()
    with pytest.raises(RuntimeError, match="this SWR object is used with no Flask app"):
        swr.state()


def test_served_without_testing_the_log_names_the_fix(caplog: pytest.LogCaptureFixture
                                                      ) -> None:
    app, _swr, _square = forgetful_app()
    assert app.test_client().get("/report").status_code == 500
    assert "swr.init_app(app)" in caplog.text
