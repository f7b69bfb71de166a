"""Settings: the shipped file loads, and every kind of bad file names the file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from service import config, errors
from service.config import ConfigError, Settings, load_settings, parse_settings

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "settings.toml"
    path.write_text(text)
    return path


def test_shipped_settings_load_with_every_spec_key() -> None:
    s = load_settings(ROOT / "settings.toml")
    assert s.cache.servers == ("127.0.0.1:11211",)
    assert s.cache.key_prefix == "svc"
    assert (s.cache.l1_max_entries, s.cache.l1_ttl, s.cache.pool_size) == (10000, 2.0, 64)
    assert (s.cache.connect_timeout, s.cache.timeout) == (0.25, 0.25)
    assert (s.refresh.concurrency, s.refresh.lock_lease, s.refresh.fetch_timeout) == (16, 30, 20)
    assert s.sources["primes"].kind == "python"
    assert (s.cache.default_timeout, s.cache.stale_while_revalidate,
            s.cache.stale_if_error) == (300, 0, 0)


def test_service_settings_env_selects_the_file(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, '[cache]\nservers = ["10.0.0.1:11211", "10.0.0.2:11212"]\n')
    monkeypatch.setenv("SERVICE_SETTINGS", str(path))
    s = load_settings()
    assert s.cache.server_addresses() == [("10.0.0.1", 11211), ("10.0.0.2", 11212)]
    assert s.path == str(path)


def test_without_the_repository_the_defaults_apply(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # Installed in site-packages: the package's parent is no repository, and a stray
    # settings.toml there belongs to somebody else.
    monkeypatch.delenv("SERVICE_SETTINGS", raising=False)
    write(tmp_path, "[cache\nthis is not ours")
    monkeypatch.setattr(config, "REPOSITORY", tmp_path)
    monkeypatch.setattr(config, "DEFAULT_PATH", tmp_path / "settings.toml")
    assert load_settings() == Settings()


def test_the_repository_file_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SERVICE_SETTINGS", raising=False)
    assert load_settings().path == str(ROOT / "settings.toml")


def test_config_error_is_importable_from_errors_and_config_imports_nothing_of_ours() -> None:
    assert errors.ConfigError is ConfigError
    source = Path(config.__file__).read_text()
    assert "from ." not in source and "import service" not in source


def test_settings_are_frozen() -> None:
    s = parse_settings({})
    with pytest.raises(AttributeError):
        s.cache.pool_size = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ("[cache]\nservrs = []\n", "cache.servrs", "unknown key"),
        ("[cach]\n", "cach", "unknown key"),
        ("[cache]\npool_size = \"64\"\n", "cache.pool_size", "a int"),
        ("[cache]\npool_size = 0\n", "cache.pool_size", ">= 1"),
        ("[cache]\ntimeout = -1\n", "cache.timeout", "positive"),
        ("[cache]\nl1_ttl = -0.5\n", "cache.l1_ttl", ">= 0"),
        ("[cache]\nl1_ttl = nan\n", "cache.l1_ttl", ">= 0"),
        ("[cache]\nconnect_timeout = true\n", "cache.connect_timeout", "seconds"),
        ("[refresh]\nlock_lease = -30\n", "refresh.lock_lease", "positive"),
        ("[cache]\nservers = []\n", "cache.servers", "at least one"),
        ("[cache]\nservers = [\"nohost\"]\n", "cache.servers", "host:port"),
        ("[cache]\nservers = [\"h:99999\"]\n", "cache.servers", "host:port"),
        ("[cache]\nservers = \"h:1\"\n", "cache.servers", "a list"),
        ("[cache]\nkey_prefix = \"has space\"\n", "cache.key_prefix", "letters"),
        ("[cache]\ndefault_timeout = -1\n", "cache.default_timeout", ">= 0"),
        ("[cache]\ndefault_timeout = 1.5\n", "cache.default_timeout", "a int"),
        ("[cache]\nstale_while_revalidate = -1\n", "cache.stale_while_revalidate", ">= 0"),
        ("[cache]\nstale_if_error = \"1h\"\n", "cache.stale_if_error", "seconds"),
        ("[sources.x]\nkind = \"ftp\"\nmax_age = 1\n", "sources.x.kind", "one of"),
        ("[sources.x]\nkind = \"http\"\n", "sources.x.max_age", "required"),
        ("[sources.x]\nkind = \"http\"\nmax_age = 1\n", "sources.x.url", "URL"),
        ("[sources.x]\nkind = \"http\"\nurl = \"http://a\"\nmax_age = -1\n",
         "sources.x.max_age", "positive"),
        ("[sources.x]\nkind = \"http\"\nurl = \"http://a\"\nmax_age = 1\ntarget = \"a:b\"\n",
         "sources.x.target", "belongs to kind 'python'"),
        ("[sources.x]\nkind = \"python\"\ntarget = \"nocolon\"\nmax_age = 1\n",
         "sources.x.target", "package.module:function"),
        ("[sources.x]\nkind = \"python\"\ntarget = \"a:b\"\nexecutor = \"gpu\"\nmax_age = 1\n",
         "sources.x.executor", "'thread' or 'process'"),
        ("[sources.x]\nkind = \"composite\"\nparts = [\"y\"]\nmax_age = 1\n",
         "sources.x.parts", "'y' is not"),
        ("[sources.x]\nkind = \"composite\"\nparts = []\nmax_age = 1\n",
         "sources.x.parts", "non-empty"),
        ("[sources.\"bad name\"]\nkind = \"http\"\n", "sources.bad name", "letters"),
        ("[server]\nlog_format = \"xml\"\n", "server.log_format", "'json' or 'text'"),
    ],
)
def test_bad_values_name_file_key_and_expectation(
    tmp_path: Path, text: str, key: str, expected: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert str(path) in message
    assert f"[{key}]" in message
    assert expected in message


def test_toml_that_does_not_parse_names_the_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[cache\nservers = [\n")
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        load_settings(path)
    assert str(path) in str(info.value)
    assert "line 1" in str(info.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read settings file"):
        load_settings(tmp_path / "nope.toml")


def test_composite_of_composite_is_refused() -> None:
    data = {"sources": {
        "a": {"kind": "http", "url": "http://x/", "max_age": 1},
        "b": {"kind": "composite", "parts": ["a"], "max_age": 1},
        "c": {"kind": "composite", "parts": ["b"], "max_age": 1},
    }}
    with pytest.raises(ConfigError, match=r"\[sources.c.parts\].*'b' is composite"):
        parse_settings(data)
