"""The Mamba retriever: a Mamba-1 bi-encoder (model), its backend over the shared vector stores and
its trainer."""
