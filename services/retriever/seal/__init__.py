"""SEAL: generative retrieval that decodes n-grams occurring in the corpus (Bevilacqua et al. 2022).

`fmindex` is the token-level FM-index of one set of passages (counts, next tokens, locations);
`segments` holds one index version: FM-index segments searched together, tombstones and merge.
"""
