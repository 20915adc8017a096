"""Retrieval service: BM25 / dense / hybrid search over the knowledge corpus, and knowledge edits."""
