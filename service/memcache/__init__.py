"""memcache"""
