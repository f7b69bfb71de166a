"""A reload (``kill -HUP``) never takes the host down: settings are checked in the master.

gunicorn re-reads its configuration on HUP and starts new workers, which load the app and
with it the settings file; if that file was made invalid meanwhile, every new worker exits
with the error, the master gives up ("worker failed to boot") and nothing listens any
more. So the master checks the file itself, at start-up and before each reload (the
gunicorn hooks ``on_starting`` and ``on_reload``):

* a good file is copied to a snapshot, whose path the workers inherit
  (``SERVICE_SETTINGS_LAST_GOOD``), and the new workers read the file as usual;
* a broken file is logged once, naming the file and the key, and the new workers, finding
  it broken too, read the last good snapshot instead (:func:`service.config.load_settings`):
  the host keeps serving with the settings it had. A later HUP with a good file takes
  effect as usual.

Imported by gunicorn's master: nothing here imports Flask or the app.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from ..config import LAST_GOOD, ConfigError, load_settings, settings_path


def check_settings(log: Any) -> bool:
    """Check the settings file the next workers will read; ``True`` when it is good (and
    now the last good one), ``False`` when it was logged as broken and the workers fall
    back to the last good one."""
    path = settings_path()
    try:
        load_settings(path, fallback=False)
    except ConfigError as exc:
        if os.environ.get(LAST_GOOD):
            log.error("settings not reloaded; the workers keep the last good ones until the "
                      "file is fixed (then kill -HUP again): %s", exc)
        return False
    if path is not None:
        _snapshot(path)
    return True


def _snapshot(path: str | os.PathLike[str]) -> None:
    data = Path(path).read_bytes()
    old = os.environ.get(LAST_GOOD)
    fd, name = tempfile.mkstemp(prefix="swr-cache-settings-", suffix=".toml")
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.environ[LAST_GOOD] = name
    if old and old != name:
        forget(old)


def forget(path: str | None = None) -> None:
    """Remove the snapshot (the master's ``on_exit``): nothing is left in the temp dir."""
    path = path or os.environ.pop(LAST_GOOD, None)
    if path:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
