"""Node configuration: defaults < config.toml < command-line flags.

* :mod:`~dicom_node.config.schema`: the frozen, typed :class:`Config` and its sections;
* :mod:`~dicom_node.config.parse`: reading and validating the TOML file (errors name file and key);
* :mod:`~dicom_node.config.rules`: series selection rules and :data:`DEFAULT_RULES`.

The contrast vocabulary (:class:`Direction`, :class:`Classification`) lives in :mod:`vocab`.
"""

from dicom_node.config.parse import load_config, parse_config
from dicom_node.config.rules import DEFAULT_RULES, SelectionRule
from dicom_node.config.schema import (Config, ConfigError, DeliveryConfig, Destination, HttpConfig, ModelConfig,
                                      NodeConfig, OutputConfig, QCConfig, RetentionConfig, SecurityConfig,
                                      SeriesConfig, StorageConfig, TLSConfig, WorkerConfig)
from vocab import Classification, Direction

__all__ = [
    "Classification",
    "Config",
    "ConfigError",
    "DEFAULT_RULES",
    "DeliveryConfig",
    "Destination",
    "Direction",
    "HttpConfig",
    "ModelConfig",
    "NodeConfig",
    "OutputConfig",
    "RetentionConfig",
    "QCConfig",
    "SecurityConfig",
    "SelectionRule",
    "SeriesConfig",
    "StorageConfig",
    "TLSConfig",
    "WorkerConfig",
    "load_config",
    "parse_config",
]
