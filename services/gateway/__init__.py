"""The Pipeline service (gateway): chunking, ingest fan-out, retrieval fan-out + fusion, rerank, generate."""
