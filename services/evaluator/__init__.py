"""Evaluator: datasets (BEIR), IR metrics over pytrec_eval, reference runs and retrieval evaluation.

- `beir`: load a BEIR folder (corpus, queries, qrels of a split) or stream its corpus.
- `ir`: nDCG@k, Recall@k, MRR@10, ... of a run, computed by pytrec_eval; passages to documents.
- `retrieval`: ingest a BEIR corpus into a fleet, search it with each retriever, score the runs.
- `baseline`: in-process BM25 and exact MiniLM runs to check the fleet's numbers against.
- `report`: markdown tables for reports and benchmarks.
"""
