"""Unit tests of service/observe/."""
