"""Data pipelines for mmpt: WebDataset shard streaming, captions, tokenization and masking.

The training stream is deterministic for a seed (shard order, shuffle buffer, crops, MLM and MAE masks)
and resumable at the exact sample, so a restarted run sees the same data it would have seen without the
interruption; bad samples and shards are skipped and counted rather than crashing a long job.
"""
