"""Evaluation of trained models: zero-shot classification and retrieval (`evaluate`) and batch
embedding of shards or folders (`embed`)."""
