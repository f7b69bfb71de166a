"""A reload (``kill -HUP``) never takes the host down: settings are checked in the master.

gunicorn re-reads its configuration on HUP and starts new workers, which load the app and
with it the settings file; if that file was made invalid meanwhile, every new worker exits
with the error, the master gives up ("worker failed to boot") and nothing listens any
more. So the master checks the file itself, at start-up and before each reload (the
gunicorn hooks ``on_starting`` and ``on_reload``):

* a good file's text is kept in the master's environment, which the workers inherit
  (``SERVICE_SETTINGS_LAST_GOOD``: a settings file is a few hundred bytes, and nothing on
  disk can outlive a killed master), and the new workers read the file as usual;
* a broken file is logged once, naming the file and the key, and the new workers, finding
  it broken too, read the last good text instead (:func:`service.config.load_settings`):
  the host keeps serving with the settings it had. A later HUP with a good file takes
  effect as usual.

Imported by gunicorn's master: nothing here imports Flask or the app.
"""

from __future__ import annotations

import os
from typing import Any

from ..config import LAST_GOOD, ConfigError, checked_text, settings_path


def check_settings(log: Any) -> bool:
    """Check the settings file the next workers will read; ``True`` when it is good (and
    now the last good one), ``False`` when it was logged as broken and the workers fall
    back to the last good one."""
    path = settings_path()
    try:
        # One read: the text checked is the text kept for the workers to fall back on.
        text = checked_text(path) if path is not None else None
    except ConfigError as exc:
        if os.environ.get(LAST_GOOD):
            log.error("settings not reloaded; the workers keep the last good ones until the "
                      "file is fixed (then kill -HUP again): %s", exc)
        return False
    if text is not None:
        os.environ[LAST_GOOD] = text
    return True


def forget() -> None:
    """Drop the last good text (the master's ``on_exit``)."""
    os.environ.pop(LAST_GOOD, None)
