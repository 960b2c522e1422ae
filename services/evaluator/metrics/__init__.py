"""Evaluation metrics: IR through pytrec_eval (`ir`), SQuAD EM/F1 (`qa`), and RAG answer metrics (`rag`)."""
