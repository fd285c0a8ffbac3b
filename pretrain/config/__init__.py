"""Run configuration: typed sections (`schema`), YAML + overrides (`loading`), all-at-once checks
(`validation`) and the generated reference (`reference`). Import from here."""

from pretrain.config.loading import (
    config_from_dict,
    dump_yaml,
    embedded_config_path,
    load_config,
    parse_override,
    to_dict,
)
from pretrain.config.reference import field_help, markdown_reference
from pretrain.config.schema import (
    CHOICES,
    CheckpointConfig,
    Config,
    ConfigError,
    ContrastiveConfig,
    CrossSiteConfig,
    DataConfig,
    DecoderConfig,
    EvalConfig,
    FinetuneConfig,
    FusionConfig,
    ITMConfig,
    LoggingConfig,
    MIMConfig,
    MLMConfig,
    ModelConfig,
    ObjectivesConfig,
    OptimConfig,
    ParallelConfig,
    RunConfig,
    TextConfig,
    TrainConfig,
    VisionConfig,
)
from pretrain.config.specs import engine_spec, stream_spec
from pretrain.config.validation import check_runtime, get_key, validate

__all__ = ["CHOICES", "CheckpointConfig", "Config", "ConfigError", "ContrastiveConfig",
           "CrossSiteConfig", "DataConfig", "DecoderConfig", "EvalConfig", "FinetuneConfig", "FusionConfig",
           "ITMConfig", "LoggingConfig",
           "MIMConfig", "MLMConfig",
           "ModelConfig", "ObjectivesConfig",
           "OptimConfig", "ParallelConfig", "RunConfig", "TextConfig", "TrainConfig", "VisionConfig",
           "check_runtime", "config_from_dict", "dump_yaml", "embedded_config_path", "engine_spec",
           "field_help", "get_key", "load_config", "markdown_reference", "parse_override", "stream_spec",
           "to_dict", "validate"]
