"""Unit tests of service/readpath/."""
