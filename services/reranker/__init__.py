"""Reranker service: reorders a query's candidate passages with a cross-encoder (and more backends)."""
