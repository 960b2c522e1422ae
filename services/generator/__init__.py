"""Generator service: answers questions from retrieved passages with Retro (per-chunk retrieval).

`service` is the gRPC Generator; `retro/` holds the model, its data format, training and decoding.
"""
