"""Data pipelines for mmpt: importers, WebDataset shard streaming, captions, tokenization and masking.

The training stream is deterministic for a seed (work items, interleaving, block permutations, crops, MLM
and MAE masks), covers every sample exactly once per epoch across ranks x workers, and is resumable at the
exact sample -- also under another number of ranks or workers -- so a restarted run sees exactly the data it
had not seen yet; bad samples and shards are skipped and counted rather than crashing a long job.
See docs/data.md.
"""
