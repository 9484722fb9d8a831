"""The HTTP API: the FastAPI application, its routes, dependencies, error responses, request
limits, the lean path for cached answers, and serving with several workers.
"""
