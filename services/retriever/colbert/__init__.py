"""ColBERT late-interaction retrieval: the token-level encoder, its training, the PLAID index, and the
retriever backend that serves them (`backend.ColbertBackend`)."""
