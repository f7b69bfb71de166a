"""The admin: its routes (``service.admin.bp``), entries, statistics, the fleet's registry
and per-minute history, and the page's template and assets."""

from . import cli as cli  # adds its commands to `flask swr`
from .routes import bp as bp

__all__ = ["bp"]
