"""Exports to other tools' formats and imports from them: HF transformers `CLIPModel` (`hf`), open_clip
(`open_clip`), with the name mapping and QKV layout helpers they share in `common`."""
