"""Celery workers: `celery -A harmprune.workers.app worker -Q gpu -c 1` (or `harmprune worker`)."""
