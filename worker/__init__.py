"""uplvp.worker: the Celery app and thin tasks that run models.pipeline and report to the registry."""
