"""Retro (RETRO, Borgeaud et al. 2022): a decoder that retrieves every chunk.

* `model`: RetroConfig, RetroModel (decoder with chunked cross-attention, neighbour encoder, KV cache),
  and the reusable blocks ChunkedCrossAttention and NeighbourEncoder.
* `retrofit`: RetrofitModel, a frozen pretrained Hugging Face causal LM given trainable CCA + encoder.
* `data`: tokenizer, prompt layout, neighbours and chunks shared by training, decoding and the demo.
* `neighbours`, `examples`: training neighbours retrieved through the fleet (cached), training rows.
* `train`, `decode`: training loop and (cached) decoding with per-chunk retrieval.
"""
