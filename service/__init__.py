"""harmprune's hardening core: load, calibrate, attribute, select, prune, evaluate, report, publish.

The one entry point is `harmprune.pipeline.run`. Nothing here imports Celery or FastAPI.
"""
