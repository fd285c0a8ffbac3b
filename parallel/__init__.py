"""Process groups, collectives and the DeepSpeed engine: everything that knows about ranks."""
