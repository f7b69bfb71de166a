"""Unit tests of service/admin/."""
