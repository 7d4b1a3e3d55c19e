"""uplvp.app: the HTTP service (FastAPI). Never imports torch: the ML runs in the Celery worker."""
