"""Reading datasets: BEIR folders (`beir`) and the collections the evaluator and the trainers use
(`collections`: BEIR, SQuAD, QA JSONL, the demo set, as one `EvalDataset`). Shared by services, so it
imports none of them."""
