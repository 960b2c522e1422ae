"""ColBERTv2 residual compression: each token vector as a centroid id plus `nbits` per dimension.

A vector v is stored as the id c of its nearest centroid (inner product; vectors and centroids are unit
length) and its residual r = v - centroid[c], every dimension of r bucketised into 2^nbits buckets and the
bucket indices packed to dim·nbits/8 bytes. Decompression is centroid[c] + the bucket's value, dimension by
dimension. As in ColBERTv2, the bucket cutoffs and values are quantiles of the residual values (all
dimensions pooled) of held-out embeddings: cutoffs at i/2^nbits (i = 1 .. 2^nbits-1), values at
(i + 0.5)/2^nbits (i = 0 .. 2^nbits-1).

Centroids come from faiss spherical k-means with few iterations on a sample. The codec itself is written by
hand: faiss's scalar quantizers space their levels uniformly between per-dimension bounds rather than at
quantiles, and PLAID's search needs the centroid id of every token on its own (its stages 1-3 score
centroid ids only), which faiss's IVF codes do not expose as arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from services.runtime.model_errors import ParamError

NBITS = (1, 2, 4)
KMEANS_NITER = 4  # ColBERTv2's default; k-means here only has to spread centroids over the space
# k-means trains on at most this many sampled embeddings per centroid (faiss asks for 39 to be quiet; on a
# CPU the training cost grows with it, and 32 gives centroids as useful for PLAID's pruning).
KMEANS_POINTS_PER_CENTROID = 32
HELDOUT_FRACTION = 0.05
HELDOUT_MAX = 100_000
# Vectors compressed at once (bounds the temporary float32 residuals).
_CHUNK = 1 << 16


def num_centroids(num_embeddings: int) -> int:
    """PLAID's 2^floor(log2(16·sqrt(#embeddings))), capped at the largest power of two <= #embeddings so
    that k-means has at least one point per centroid on a tiny first batch."""
    if num_embeddings < 1:
        raise ParamError("num_embeddings", "must be positive")
    plaid = 2 ** int(np.floor(np.log2(16 * np.sqrt(num_embeddings))))
    return min(plaid, 2 ** int(np.floor(np.log2(num_embeddings))))


def _normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


@dataclass(frozen=True)
class ResidualCodec:
    """Centroids (C, dim) float32, bucket cutoffs (2^nbits - 1,) and bucket values (2^nbits,) float32."""

    centroids: np.ndarray
    cutoffs: np.ndarray
    weights: np.ndarray
    nbits: int

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    @property
    def num_centroids(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def packed_bytes(self) -> int:
        """Bytes of one packed residual."""
        return self.dim * self.nbits // 8

    @classmethod
    def train(cls, embeddings: np.ndarray, nbits: int, *, seed: int = 0) -> ResidualCodec:
        """Centroids by k-means on a sample of `embeddings` (n, dim), bucket cutoffs and values from the
        residuals of a held-out part of the sample (of the training part when under 20 embeddings)."""
        import faiss

        if nbits not in NBITS:
            raise ParamError("nbits", f"must be one of {NBITS}")
        n, dim = embeddings.shape
        if dim * nbits % 8:
            raise ParamError("dim", "dim·nbits must be a multiple of 8")
        rng = np.random.default_rng(seed)
        n_heldout = min(HELDOUT_MAX, int(n * HELDOUT_FRACTION))
        k = min(num_centroids(n), num_centroids(n - n_heldout))
        n_sample = min(n, n_heldout + k * KMEANS_POINTS_PER_CENTROID)
        sample = np.sort(rng.choice(n, size=n_sample, replace=False))
        sample = np.ascontiguousarray(embeddings[sample], dtype=np.float32)
        heldout, train = sample[:n_heldout], sample[n_heldout:]
        kmeans = faiss.Kmeans(
            dim, k, niter=KMEANS_NITER, spherical=True, seed=seed, min_points_per_centroid=1
        )
        kmeans.train(train)
        centroids = _normalise(kmeans.centroids.astype(np.float32))
        codec = cls(centroids, np.zeros(2**nbits - 1, np.float32), np.zeros(2**nbits, np.float32), nbits)
        held = heldout if len(heldout) else train
        residuals = (held - centroids[codec.assign(held)]).ravel()
        levels = 2**nbits
        cutoffs = np.quantile(residuals, np.arange(1, levels) / levels).astype(np.float32)
        weights = np.quantile(residuals, (np.arange(levels) + 0.5) / levels).astype(np.float32)
        return cls(centroids, cutoffs, weights, nbits)

    def assign(self, vectors: np.ndarray) -> np.ndarray:
        """(n,) int32: the nearest centroid (largest inner product) of each of `vectors` (n, dim)."""
        import faiss

        index = faiss.IndexFlatIP(self.dim)
        index.add(self.centroids)
        codes = np.empty(len(vectors), np.int32)
        for start in range(0, len(vectors), _CHUNK):
            chunk = np.ascontiguousarray(vectors[start : start + _CHUNK], dtype=np.float32)
            codes[start : start + len(chunk)] = index.search(chunk, 1)[1][:, 0]
        return codes

    def compress(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Centroid ids (n,) int32 and packed residuals (n, dim·nbits/8) uint8 of `vectors` (n, dim)."""
        codes = self.assign(vectors)
        packed = np.empty((len(vectors), self.packed_bytes), np.uint8)
        shifts = np.arange(self.nbits - 1, -1, -1, dtype=np.uint8)
        for start in range(0, len(vectors), _CHUNK):
            end = min(start + _CHUNK, len(vectors))
            residuals = np.asarray(vectors[start:end], np.float32) - self.centroids[codes[start:end]]
            buckets = np.searchsorted(self.cutoffs, residuals).astype(np.uint8)  # (m, dim)
            bits = (buckets[:, :, None] >> shifts) & 1  # (m, dim, nbits), most significant bit first
            packed[start:end] = np.packbits(bits.reshape(end - start, -1), axis=1)
        return codes, packed

    @cached_property
    def _byte_table(self) -> np.ndarray:
        """(256, 8/nbits) float32: the bucket values a packed byte stands for, in dimension order."""
        bits = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1)  # (256, 8)
        per_byte = 8 // self.nbits
        place = 2 ** np.arange(self.nbits - 1, -1, -1)
        buckets = bits.reshape(256, per_byte, self.nbits) @ place
        return self.weights[buckets]

    def decompress(self, codes: np.ndarray, packed: np.ndarray) -> np.ndarray:
        """(n, dim) float32 vectors from centroid ids (n,) and packed residuals (n, dim·nbits/8)."""
        # np.take gathers rows several times faster than fancy indexing.
        residuals = np.take(self._byte_table, packed, axis=0).reshape(len(codes), self.dim)
        return np.take(self.centroids, codes, axis=0) + residuals
