"""Settings from a Flask config: Flask-Caching's keys, layered under SERVICE_SETTINGS."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from service.config import FLASK_CONFIG, CacheSettings, ConfigError, parse_settings
from service.flask.backend import flask_caching_config
from service.flask.flaskconfig import library_settings, namespace_for, settings_from_flask


@pytest.fixture(autouse=True)
def _no_settings_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SERVICE_SETTINGS", raising=False)


def cache(config: dict[str, Any]) -> CacheSettings:
    return settings_from_flask(config).cache


def test_no_keys_gives_the_defaults() -> None:
    assert settings_from_flask({}) == parse_settings({}, FLASK_CONFIG)
    assert settings_from_flask({}).path == "<Flask config>"


def test_keys_that_are_not_ours_are_ignored() -> None:
    config = {"CACHE_TYPE": "service.backend.MemcachedCache", "CACHE_THRESHOLD": 500,
              "CACHE_ARGS": [], "SECRET_KEY": "x", "CACHE_NO_NULL_WARNING": True}
    assert cache(config) == CacheSettings()


@pytest.mark.parametrize(("servers", "expected"), [
    (["10.0.0.1:11211", "10.0.0.2:11212"], ("10.0.0.1:11211", "10.0.0.2:11212")),
    (("a:1",), ("a:1",)),
    ("a:1, b:2", ("a:1", "b:2")),
    ("a:1", ("a:1",)),
    (["cache.internal"], ("cache.internal:11211",)),
    ("[::1]:11211", ("[::1]:11211",)),
])
def test_memcached_servers(servers: Any, expected: tuple[str, ...]) -> None:
    assert cache({"CACHE_MEMCACHED_SERVERS": servers}).servers == expected


def test_none_servers_mean_the_default_as_flask_caching_sets_it() -> None:
    assert cache({"CACHE_MEMCACHED_SERVERS": None}).servers == ("127.0.0.1:11211",)


def test_a_legal_prefix_is_kept() -> None:
    assert cache({"CACHE_KEY_PREFIX": "flask_cache_"}).key_prefix == "flask_cache_"
    assert cache({"CACHE_KEY_PREFIX": "app-1.v2"}).key_prefix == "app-1.v2"


@pytest.mark.parametrize("prefix", ["myapp:", "", "with space", "ü" * 3, "x" * 100, "a/b"])
def test_any_other_prefix_becomes_a_legal_deterministic_namespace(prefix: str) -> None:
    derived = cache({"CACHE_KEY_PREFIX": prefix}).key_prefix
    assert re.fullmatch(r"[A-Za-z0-9_.-]{1,32}", derived)
    assert derived == namespace_for(prefix)      # same on every worker and host
    assert derived != namespace_for(prefix + "x")


def test_prefixes_that_differ_only_in_illegal_characters_stay_apart() -> None:
    assert namespace_for("app:") != namespace_for("app/") != namespace_for("app")


def test_default_timeout_as_seconds_or_timedelta() -> None:
    assert cache({"CACHE_DEFAULT_TIMEOUT": 60}).default_timeout == 60
    assert cache({"CACHE_DEFAULT_TIMEOUT": 0}).default_timeout == 0
    assert cache({"CACHE_DEFAULT_TIMEOUT": timedelta(minutes=2)}).default_timeout == 120
    # Rounded up like Flask-Caching: a sub-second timeout must not become "forever".
    assert cache({"CACHE_DEFAULT_TIMEOUT": timedelta(milliseconds=1)}).default_timeout == 1


def test_cache_options_are_the_pool_and_tier_settings() -> None:
    options = {"pool_size": 8, "connect_timeout": 0.1, "timeout": 0.2, "pool_timeout": 0.5,
               "item_size_max": 4096, "circuit_failures": 5, "circuit_reset": 1.5,
               "l1_max_entries": 10, "l1_ttl": 0.5}
    settings = cache({"CACHE_OPTIONS": options})
    assert {name: getattr(settings, name) for name in options} == options


def test_cache_options_may_carry_the_basecache_arguments() -> None:
    # Flask-Caching passes CACHE_OPTIONS to the backend as keyword arguments, so these two
    # are legal there; default_timeout in CACHE_OPTIONS wins, as in Flask-Caching.
    settings = cache({"CACHE_DEFAULT_TIMEOUT": 10, "CACHE_OPTIONS": {
        "default_timeout": timedelta(seconds=30), "ignore_delete_many_errors": True}})
    assert settings.default_timeout == 30


def test_stale_windows() -> None:
    settings = cache({"CACHE_STALE_WHILE_REVALIDATE": 600,
                      "CACHE_STALE_IF_ERROR": timedelta(hours=1)})
    assert (settings.stale_while_revalidate, settings.stale_if_error) == (600.0, 3600.0)


@pytest.mark.parametrize(("config", "key", "expected"), [
    ({"CACHE_MEMCACHED_SERVERS": 11211}, "CACHE_MEMCACHED_SERVERS", "separated by , or ;"),
    ({"CACHE_MEMCACHED_SERVERS": ["h:99999"]}, "CACHE_MEMCACHED_SERVERS", "port 1-65535"),
    ({"CACHE_MEMCACHED_SERVERS": []}, "CACHE_MEMCACHED_SERVERS", "at least one"),
    ({"CACHE_MEMCACHED_SERVERS": ["a:1", "a:1"]}, "CACHE_MEMCACHED_SERVERS", "once"),
    ({"CACHE_KEY_PREFIX": 7}, "CACHE_KEY_PREFIX", "a string"),
    ({"CACHE_DEFAULT_TIMEOUT": -1}, "CACHE_DEFAULT_TIMEOUT", ">= 0"),
    ({"CACHE_DEFAULT_TIMEOUT": "300"}, "CACHE_DEFAULT_TIMEOUT", "a int"),
    ({"CACHE_STALE_WHILE_REVALIDATE": -5}, "CACHE_STALE_WHILE_REVALIDATE", ">= 0"),
    ({"CACHE_STALE_IF_ERROR": "1h"}, "CACHE_STALE_IF_ERROR", "seconds"),
    ({"CACHE_OPTIONS": ["pool_size", 8]}, "CACHE_OPTIONS", "a dict"),
    ({"CACHE_OPTIONS": {"behaviors": {}}}, "CACHE_OPTIONS.behaviors", "a known option"),
    ({"CACHE_OPTIONS": {"pool_size": "8"}}, "CACHE_OPTIONS.pool_size", "a int"),
    ({"CACHE_OPTIONS": {"pool_size": 0}}, "CACHE_OPTIONS.pool_size", ">= 1"),
    ({"CACHE_OPTIONS": {"timeout": 0}}, "CACHE_OPTIONS.timeout", "positive"),
    ({"CACHE_OPTIONS": {"l1_ttl": True}}, "CACHE_OPTIONS.l1_ttl", "seconds"),
    ({"CACHE_OPTIONS": {"key_prefix": "x"}}, "CACHE_OPTIONS.key_prefix", "a known option"),
])
def test_bad_values_name_the_flask_key(config: dict[str, Any], key: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_flask(config)
    message = str(info.value)
    assert message.startswith("<Flask config>: ")
    assert f"[{key}]" in message
    assert expected in message


def test_library_settings_without_a_file_is_the_flask_config() -> None:
    config = {"CACHE_MEMCACHED_SERVERS": ["m:1"], "CACHE_KEY_PREFIX": "app"}
    assert library_settings(config) == settings_from_flask(config)


def test_library_settings_never_reads_a_settings_toml_it_was_not_pointed_at(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "settings.toml").write_text("[cache\nbroken")
    monkeypatch.chdir(tmp_path)
    assert library_settings({}).cache == CacheSettings()


def test_the_service_settings_file_overrides_key_by_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ops.toml"
    path.write_text('[cache]\nservers = ["ops:11211"]\npool_size = 3\n'
                    '[refresh]\nconcurrency = 2\n'
                    '[sources.s]\nkind = "http"\nurl = "http://o/"\nmax_age = 1\n')
    monkeypatch.setenv("SERVICE_SETTINGS", str(path))
    s = library_settings({"CACHE_MEMCACHED_SERVERS": ["app:11211"], "CACHE_KEY_PREFIX": "app",
                          "CACHE_OPTIONS": {"pool_size": 9, "timeout": 0.1}})
    assert s.cache.servers == ("ops:11211",)        # the file wins where it speaks
    assert s.cache.pool_size == 3
    assert s.cache.key_prefix == "app"               # the Flask config where it does not
    assert s.cache.timeout == 0.1
    assert s.refresh.concurrency == 2
    assert list(s.sources) == ["s"]
    assert s.path == str(path)


def test_a_bad_service_settings_file_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ops.toml"
    path.write_text("[cache]\npool_size = 0\n")
    monkeypatch.setenv("SERVICE_SETTINGS", str(path))
    with pytest.raises(ConfigError, match=re.escape(f"{path}: [cache.pool_size]")):
        library_settings({})
    monkeypatch.setenv("SERVICE_SETTINGS", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="cannot read settings file"):
        library_settings({})


def test_flask_caching_config_round_trips() -> None:
    settings = parse_settings({"cache": {
        "servers": ["a:1", "b:2"], "key_prefix": "p", "pool_size": 7, "l1_ttl": 0.5,
        "default_timeout": 0, "stale_while_revalidate": 30, "stale_if_error": 60}}).cache
    config = flask_caching_config(settings)
    assert config["CACHE_TYPE"] == "service.backend.MemcachedCache"
    assert settings_from_flask(config).cache == settings


@pytest.mark.parametrize("servers", ["a:1;b:2", "a:1, b:2", " a:1 ; b:2 ", "a:1,b:2;"])
def test_server_strings_split_as_flask_caching_splits_them(servers: str) -> None:
    settings = settings_from_flask({"CACHE_MEMCACHED_SERVERS": servers})
    assert settings.cache.servers == ("a:1", "b:2")


def test_an_unknown_cache_option_names_itself_and_the_nearest_valid_one() -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from_flask({"CACHE_OPTIONS": {"pool_szie": 4}})
    message = str(caught.value)
    assert "CACHE_OPTIONS.pool_szie" in message and "did you mean 'pool_size'" in message
    assert "got 'pool_szie'" in message
