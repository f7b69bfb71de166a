"""Unit tests of service/memcache/."""
