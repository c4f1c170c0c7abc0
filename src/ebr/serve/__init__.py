"""Serving: the Retriever (used by evaluation too) and the HTTP service."""
