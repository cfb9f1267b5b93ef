"""The hybrid Koopman trainer: a small language model with a Koopman auxiliary loss. Knows nothing of Optuna."""

from koopman_search.trainer.config import (
    DataConfig,
    KoopmanConfig,
    ModelConfig,
    TrainConfig,
    TrainerConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    with_overrides,
)
from koopman_search.trainer.errors import CheckpointError, ConfigError, DataError, DataUnavailable, KoopmanError
from koopman_search.trainer.records import RECORD_FIELDS, EpochRecord

__all__ = [
    "RECORD_FIELDS",
    "CheckpointError",
    "ConfigError",
    "DataConfig",
    "DataError",
    "DataUnavailable",
    "EpochRecord",
    "HybridKoopmanTrainer",
    "KoopmanConfig",
    "KoopmanError",
    "ModelConfig",
    "TrainConfig",
    "TrainerConfig",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "with_overrides",
]


def __getattr__(name: str) -> object:
    # torch is imported only when the trainer itself is needed, so that `import trainer` stays light
    if name == "HybridKoopmanTrainer":
        from koopman_search.trainer.loop import HybridKoopmanTrainer

        return HybridKoopmanTrainer
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
