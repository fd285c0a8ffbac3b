"""Everything about checkpoints, in one room.

- `atomic`: atomic save, markers, and the checked, weights-only DeepSpeed load
- `tags`: complete tags in save order, the `latest` fallback, retention (`keep_last`, `keep_every`), rollbacks
- `weights_only`: loading that never unpickles (ours and DeepSpeed's readers), refusals named
- `write_errors`: a write failing on one rank is recorded, not raised mid-collective (no hang)
- `sources`: read any checkpoint (DeepSpeed ZeRO folder, universal, safetensors) as named tensors
- `zero_reader`: stream full tensors out of ZeRO-3 shards without holding the model
- `tp_split`: merge and split tensor-parallel shards
- `universal`, `universal_load`: the layout-free format, written and loaded under any (dp, tp)
- `tensor_files`: safetensors writing, staged outputs, sha256 manifests
- `resume`: where a run starts (resume of any kind, `--init-from`)
- `hparams`: a resume takes this run's optimizer settings at the checkpoint's position
- `run_dir`: a fresh start never writes over another run's outputs (`--overwrite-run`); nothing to train
- `convert`: `pretrain convert` (universal, safetensors, HF, open_clip in and out)
"""
