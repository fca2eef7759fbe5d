"""The job API (FastAPI): `create_app(settings)` in harmprune.api.main. Thin: validation, auth, the job
store and the queue. Nothing here imports torch."""
