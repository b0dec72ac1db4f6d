import numpy as np
import pytest

from msif_assets.lake.embeddings import (
    EmbeddingModelError, embedding_dimension, encode_texts, load_sentence_encoder,
)


def test_bundled_minilm_encodes_normalized_and_semantic():
    model = load_sentence_encoder(device="cpu")
    assert embedding_dimension(model) == 384
    texts = ["Paris is the capital of France.", "The French capital is Paris.", "Bananas are rich in potassium."]
    vectors = encode_texts(model, texts, batch_size=2)
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    sims = vectors @ vectors.T
    assert sims[0, 1] > sims[0, 2] + 0.2
    assert encode_texts(model, []).shape == (0, 384)


def test_override_dir_must_be_a_sentence_transformer(tmp_path):
    with pytest.raises(EmbeddingModelError, match="not a sentence-transformers folder"):
        load_sentence_encoder(tmp_path)
