"""The small typed specs that `data_pipelines` and `parallel` take instead of the whole `Config`, so
imports run one way (`pretrain` -> `data_pipelines`, `pretrain` -> `parallel`)."""

from __future__ import annotations

from data_pipelines.settings import StreamSpec
from parallel.settings import EngineSpec
from pretrain.config.schema import Config


def stream_spec(cfg: Config) -> StreamSpec:
    """The non-data numbers the training stream needs."""
    m = cfg.model
    return StreamSpec(seed=cfg.train.seed, micro_batch=cfg.train.micro_batch, image_size=m.image_size,
                      patch_size=m.vision.patch_size, context_length=m.text.context_length,
                      mlm_prob=cfg.objectives.mlm.mask_prob,
                      caption_negatives=(cfg.objectives.itm.caption_negatives and cfg.model.fusion.layers > 0
                                         and cfg.objectives.itm.weight > 0),
                      negatives_per_step=cfg.objectives.itm.caption_negatives_per_step,
                      skew_phrase=(cfg.objectives.itm.skew_phrase if cfg.objectives.itm.skew_steps > 0
                                   and cfg.objectives.itm.weight > 0 and cfg.model.fusion.layers > 0 else ""))


def engine_spec(cfg: Config) -> EngineSpec:
    """Everything the DeepSpeed engine is built from."""
    t = cfg.train
    return EngineSpec(optim=cfg.optim, parallel=cfg.parallel, steps=t.steps, micro_batch=t.micro_batch,
                      grad_accum=t.grad_accum, grad_clip=t.grad_clip, precision=t.precision, seed=t.seed,
                      fp16_initial_scale_power=t.fp16_initial_scale_power,
                      hidden=max(cfg.model.vision.width, cfg.model.text.width),
                      compile_model=t.compile and t.compile_scope == "model")
