"""Retriever service: one or more backends (dense, bm25) over passages each stores itself."""
