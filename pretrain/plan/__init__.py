"""Planning before a run: per-rank memory of model states (`memory`, also `pretrain plan`), activation
and workspace estimates with the largest micro-batch that fits (`activations`), analytic FLOPs (`flops`)."""
