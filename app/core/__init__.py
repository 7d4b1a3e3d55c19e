"""Settings and errors shared by the API and the worker."""
