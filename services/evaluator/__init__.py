"""Evaluator: datasets, metrics, experiment sweeps and reports, and the Evaluator gRPC service.

- `datasets` (with `beir`, the BEIR file reader): one `EvalDataset` from BEIR folders, SQuAD 1.1/2.0
  JSON, QA JSONL or the demo set, validated whole.
- `metrics`: `ir` (pytrec_eval), `qa` (SQuAD EM/F1, official semantics), `rag` (six RAG answer metrics).
- `experiments`: sweeps over pipeline settings through the live services; one record per run.
- `retrieval`: `ragfleet eval retrieval`, the experiment that scores each retriever on a BEIR split.
- `report`, `significance`: markdown + HTML reports with plots and paired significance tests.
- `baseline`: in-process BM25 and exact MiniLM runs to check the fleet's numbers against.
- `service`: the Evaluator gRPC service (ScoreRetrieval, ScoreAnswers, RunExperiment).
"""
