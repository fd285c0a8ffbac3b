"""mmpt pretraining: models, objectives, training loop, checkpoints, evaluation and the CLI."""

__version__ = "0.1.0"
