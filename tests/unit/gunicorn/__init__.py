"""Unit tests of service/gunicorn/."""
