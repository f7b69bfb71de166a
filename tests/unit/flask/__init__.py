"""Unit tests of service/flask/."""
