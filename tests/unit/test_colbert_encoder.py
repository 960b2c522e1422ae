"""The ColBERT encoder on a tiny checkpoint the tests write themselves, and once on MiniLM (offline)."""

import json
import os
import string

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertModel, BertTokenizer

from services.retriever.colbert.encoder import ColbertEncoder, untrained_projection
from services.runtime.model_errors import ArtifactError, ParamError

WORDS = (
    "the a of is in and to with on for cell cells protein gene genes dna rna study cancer mouse human "
    "blood heart brain drug risk virus vaccine tumour growth patients therapy effect increase decrease "
    "paris tower river city music song football goal weather rain"
).split()
VOCAB = ["[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.punctuation, *WORDS]
IDS = {token: i for i, token in enumerate(VOCAB)}
TINY_DIM = 16
TINY_METADATA = {"query_maxlen": 32, "doc_maxlen": 220, "dim": TINY_DIM, "note": "kept on save"}


def make_tiny_checkpoint(path, *, metadata=TINY_METADATA, pytorch_bin=False, seed=0):
    """A 2-layer BERT ColBERT checkpoint in the colbertv2.0 layout; returns (BertModel, linear weight)."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    bert = BertModel(config, add_pooling_layer=False).eval()
    linear = torch.randn(TINY_DIM, config.hidden_size)
    path.mkdir(parents=True)
    config.architectures = ["HF_ColBERT"]
    config.save_pretrained(path)
    BertTokenizer(vocab=IDS).save_pretrained(path)
    weights = {f"bert.{k}": v.contiguous() for k, v in bert.state_dict().items()}
    weights["linear.weight"] = linear
    if pytorch_bin:
        torch.save(weights, path / "pytorch_model.bin")
    else:
        save_file(weights, path / "model.safetensors")
    if metadata is not None:
        (path / "artifact.metadata").write_text(json.dumps(metadata))
    return bert, linear


def expected_vectors(bert, linear, tokens, attention, keep=None):
    """What ColBERT computes, written out: BERT on the given tokens, projection, L2 normalisation."""
    ids = torch.tensor([[IDS[t] for t in tokens]])
    with torch.no_grad():
        hidden = bert(input_ids=ids, attention_mask=torch.tensor([attention])).last_hidden_state[0]
    vectors = torch.nn.functional.normalize(hidden @ linear.T, dim=-1)
    return vectors if keep is None else vectors[keep]


@pytest.fixture
def tiny(tmp_path):
    bert, linear = make_tiny_checkpoint(tmp_path / "ckpt")
    return tmp_path / "ckpt", bert, linear


def test_queries_are_marked_padded_with_mask_and_truncated(tiny):
    path, bert, linear = tiny
    encoder = ColbertEncoder.load(str(path))
    assert (encoder.dim, encoder.query_maxlen, encoder.doc_maxlen) == (TINY_DIM, 32, 220)
    long_query = " ".join(WORDS[:40])
    vectors, lengths = encoder.encode_queries(["cell protein?", long_query])
    assert vectors.shape == (2, 32, TINY_DIM) and vectors.dtype == torch.float32
    assert lengths.tolist() == [32, 32] and lengths.dtype == torch.int64
    torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(2, 32))

    # [CLS] [Q] text [SEP], then [MASK] up to 32; by default nothing attends to the [MASK] tokens.
    tokens = ["[CLS]", "[unused0]", "cell", "protein", "?", "[SEP]"] + ["[MASK]"] * 26
    expected = expected_vectors(bert, linear, tokens, [1] * 6 + [0] * 26)
    torch.testing.assert_close(vectors[0], expected, atol=1e-5, rtol=1e-5)
    # A long query keeps its first 29 tokens.
    tokens = ["[CLS]", "[unused0]", *WORDS[:29], "[SEP]"]
    torch.testing.assert_close(
        vectors[1], expected_vectors(bert, linear, tokens, [1] * 32), atol=1e-5, rtol=1e-5
    )


def test_attend_to_mask_tokens_from_metadata(tmp_path):
    bert, linear = make_tiny_checkpoint(
        tmp_path / "c", metadata={**TINY_METADATA, "attend_to_mask_tokens": True}
    )
    vectors, _ = ColbertEncoder.load(str(tmp_path / "c")).encode_queries(["gene"])
    tokens = ["[CLS]", "[unused0]", "gene", "[SEP]"] + ["[MASK]"] * 28
    torch.testing.assert_close(
        vectors[0], expected_vectors(bert, linear, tokens, [1] * 32), atol=1e-5, rtol=1e-5
    )


def test_documents_drop_punctuation_keep_order_and_honour_doc_maxlen(tiny):
    path, bert, linear = tiny
    encoder = ColbertEncoder.load(str(path))
    texts = ["the cell, a protein!", "", " ".join(WORDS), "gene."]
    docs = encoder.encode_documents(texts, batch_size=2)
    assert [d.shape for d in docs] == [
        (7, TINY_DIM),
        (3, TINY_DIM),
        (len(WORDS) + 3, TINY_DIM),
        (4, TINY_DIM),
    ]
    assert all(d.dtype == np.float16 for d in docs)
    for d in docs:
        np.testing.assert_allclose(np.linalg.norm(d.astype(np.float32), axis=1), 1.0, atol=2e-3)
    tokens = ["[CLS]", "[unused1]", "the", "cell", ",", "a", "protein", "!", "[SEP]"]
    expected = expected_vectors(bert, linear, tokens, [1] * 9, keep=[0, 1, 2, 3, 5, 6, 8])
    np.testing.assert_allclose(docs[0].astype(np.float32), expected.numpy(), atol=2e-3)
    # Batching and length sorting do not change a document's vectors.
    for text, batched in zip(texts, docs, strict=True):
        np.testing.assert_allclose(encoder.encode_documents([text])[0], batched, atol=2e-3)

    short = ColbertEncoder.load(str(path), doc_maxlen=8)
    (cut,) = short.encode_documents([" ".join(WORDS)])
    tokens = ["[CLS]", "[unused1]", *WORDS[:5], "[SEP]"]
    np.testing.assert_allclose(
        cut.astype(np.float32), expected_vectors(bert, linear, tokens, [1] * 8), atol=2e-3
    )


def test_punctuation_is_kept_when_the_checkpoint_says_so(tmp_path):
    make_tiny_checkpoint(tmp_path / "c", metadata={**TINY_METADATA, "mask_punctuation": False})
    (doc,) = ColbertEncoder.load(str(tmp_path / "c")).encode_documents(["the cell, a protein!"])
    assert doc.shape == (9, TINY_DIM)


def test_save_load_round_trip_is_exact_and_keeps_training_state(tiny, tmp_path):
    path, _, _ = tiny
    encoder = ColbertEncoder.load(str(path), doc_maxlen=64)
    texts = ["cancer risk of the drug", "music, rain and football"]
    out = tmp_path / "saved"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "marker").write_text("x")
    (out / "stale.bin").write_text("old model file")
    encoder.save(out)
    assert (out / "checkpoints" / "marker").read_text() == "x"
    assert not (out / "stale.bin").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    weights = load_file(out / "model.safetensors")
    assert "linear.weight" in weights and all(k == "linear.weight" or k.startswith("bert.") for k in weights)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["HF_ColBERT"]
    metadata = json.loads((out / "artifact.metadata").read_text())
    assert metadata["note"] == "kept on save" and metadata["doc_maxlen"] == 64 and metadata["dim"] == TINY_DIM

    again = ColbertEncoder.load(str(out))
    assert again.doc_maxlen == 64
    assert torch.equal(again.encode_queries(texts)[0], encoder.encode_queries(texts)[0])
    for a, b in zip(again.encode_documents(texts), encoder.encode_documents(texts), strict=True):
        assert np.array_equal(a, b)


def test_pytorch_bin_checkpoint_loads_without_unpickling(tmp_path, monkeypatch):
    make_tiny_checkpoint(tmp_path / "st")
    make_tiny_checkpoint(tmp_path / "bin", pytorch_bin=True)
    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    from_bin = ColbertEncoder.load(str(tmp_path / "bin"))
    assert calls and all(flag is True for flag in calls)
    from_safetensors = ColbertEncoder.load(str(tmp_path / "st"))
    texts = ["heart blood therapy"]
    torch.testing.assert_close(from_bin.encode_queries(texts)[0], from_safetensors.encode_queries(texts)[0])


def _raised(call) -> type[Exception]:
    with pytest.raises(Exception) as caught:
        call()
    return caught.type


def test_missing_or_broken_checkpoints_are_artifact_errors(tmp_path):
    assert _raised(lambda: ColbertEncoder.load(str(tmp_path / "nowhere"))) is ArtifactError
    assert _raised(lambda: ColbertEncoder.load("no-such-org/no-such-colbert")) is ArtifactError

    make_tiny_checkpoint(tmp_path / "nolinear")
    weights = load_file(tmp_path / "nolinear" / "model.safetensors")
    del weights["linear.weight"]
    save_file(weights, tmp_path / "nolinear" / "model.safetensors")
    assert _raised(lambda: ColbertEncoder.load(str(tmp_path / "nolinear"))) is ArtifactError

    make_tiny_checkpoint(tmp_path / "truncated")
    blob = (tmp_path / "truncated" / "model.safetensors").read_bytes()
    (tmp_path / "truncated" / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    assert _raised(lambda: ColbertEncoder.load(str(tmp_path / "truncated"))) is ArtifactError

    make_tiny_checkpoint(tmp_path / "dim", metadata={**TINY_METADATA, "dim": 8})
    assert _raised(lambda: ColbertEncoder.load(str(tmp_path / "dim"))) is ArtifactError

    make_tiny_checkpoint(tmp_path / "flipr", metadata={**TINY_METADATA, "interaction": "flipr"})
    assert _raised(lambda: ColbertEncoder.load(str(tmp_path / "flipr"))) is ArtifactError

    make_tiny_checkpoint(tmp_path / "long", metadata={**TINY_METADATA, "doc_maxlen": 300})
    assert _raised(lambda: ColbertEncoder.load(str(tmp_path / "long"))) is ArtifactError

    make_tiny_checkpoint(tmp_path / "ok")
    bad_maxlen = lambda: ColbertEncoder.load(str(tmp_path / "ok"), doc_maxlen=1000)  # noqa: E731
    assert _raised(bad_maxlen) is ParamError


def test_dim_comes_from_the_projection_without_metadata(tmp_path):
    make_tiny_checkpoint(tmp_path / "c", metadata=None)
    encoder = ColbertEncoder.load(str(tmp_path / "c"))
    assert (encoder.dim, encoder.query_maxlen, encoder.doc_maxlen) == (TINY_DIM, 32, 220)


def test_minilm_with_the_untrained_projection():
    encoder = ColbertEncoder.load("all-MiniLM-L6-v2")
    assert encoder.dim == 128 and encoder.hidden_size == 384
    assert "all-MiniLM-L6-v2" in encoder.model_id and "untrained" in encoder.model_id
    assert torch.equal(encoder.projection, untrained_projection(384, 128))
    torch.testing.assert_close(encoder.projection @ encoder.projection.T, torch.eye(128), atol=1e-5, rtol=0)
    q, q_lengths = encoder.encode_queries(["Which bird cannot fly?"])
    docs = encoder.encode_documents(
        ["Penguins live in the southern hemisphere and cannot fly.", "The stock market fell on Monday."]
    )
    assert q.shape == (1, 32, 128) and q_lengths.tolist() == [32]
    scores = [float((q[0] @ torch.from_numpy(d.astype(np.float32)).T).amax(dim=1).sum()) for d in docs]
    assert scores[0] > scores[1]


def test_untrained_projection_is_fixed_by_its_seed():
    assert torch.equal(untrained_projection(48, 8), untrained_projection(48, 8))
    assert not torch.equal(untrained_projection(48, 8), untrained_projection(48, 8, seed=1))


def test_a_delta_over_minilm_round_trips_its_layers_and_projection(tmp_path):
    encoder = ColbertEncoder.load("all-MiniLM-L6-v2")
    with torch.no_grad():
        top = encoder.bert.encoder.layer[-1]
        top.output.dense.weight.add_(0.01 * torch.randn_like(top.output.dense.weight))
        encoder.projection = untrained_projection(384, 128, seed=3)
    encoder.metadata["ragfleet_training"] = {"steps": 7}
    path = tmp_path / "delta.safetensors"
    encoder.save_delta(path, layers=1)
    keys = load_file(path).keys()
    assert "linear.weight" in keys and all(k.startswith(("bert.encoder.layer.5.", "linear.")) for k in keys)
    assert path.stat().st_size < 4 * 2**20

    loaded = ColbertEncoder.load_delta(path, doc_maxlen=100)
    assert loaded.doc_maxlen == 100 and loaded.metadata["ragfleet_training"] == {"steps": 7}
    assert loaded.model_id.startswith("colbert:delta@")
    texts = ["Penguins live in the southern hemisphere and cannot fly."]
    expected, got = encoder.encode_documents(texts)[0], loaded.encode_documents(texts)[0]
    assert np.abs(expected.astype(np.float32) - got.astype(np.float32)).max() < 5e-3
    assert not np.allclose(got, ColbertEncoder.load("all-MiniLM-L6-v2").encode_documents(texts)[0])

    broken = {k: v for k, v in load_file(path).items() if k != "linear.weight"}
    save_file(
        broken, tmp_path / "broken.safetensors", metadata={"base": "all-MiniLM-L6-v2", "settings": "{}"}
    )
    with pytest.raises(ArtifactError, match="linear.weight"):
        ColbertEncoder.load_delta(tmp_path / "broken.safetensors")
    with pytest.raises(ArtifactError, match="does not load"):
        ColbertEncoder.load_delta(tmp_path / "missing.safetensors")
