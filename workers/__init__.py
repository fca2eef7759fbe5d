"""Celery workers: `celery -A workers.app worker -Q gpu -c 1` (or `harmprune worker`)."""
