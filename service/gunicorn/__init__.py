"""gunicorn"""
