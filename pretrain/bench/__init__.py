"""Benchmarks: training step throughput and MFU (`step`), the open_clip side-by-side (`vs_open_clip`),
contrastive-loss memory (`loss`), checkpoint I/O (`ckpt`); `commands` registers every `pretrain bench`
subcommand, and `timing` holds the shared timing loop."""
