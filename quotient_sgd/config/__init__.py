"""Config schema and its validation (DESIGN "Data flow of a run").

A config file ``configs/<name>.py`` defines ``get_config()`` returning an ``ml_collections.ConfigDict``
(start from :func:`default_config`).  :func:`validate` turns it, once, into typed frozen :class:`Settings` or
raises :class:`ConfigError` naming the key, the value and what is allowed.
"""

from ._settings import MODELS as MODELS
from ._settings import SWEEP_AXES as SWEEP_AXES
from ._settings import CheckpointSettings as CheckpointSettings
from ._settings import DataSettings as DataSettings
from ._settings import LoggingSettings as LoggingSettings
from ._settings import ModelSettings as ModelSettings
from ._settings import ObservableSettings as ObservableSettings
from ._settings import OptimSettings as OptimSettings
from ._settings import Settings as Settings
from ._settings import SweepSettings as SweepSettings
from ._settings import SymmetrySettings as SymmetrySettings
from ._settings import default_config as default_config
from ._validate import ConfigError as ConfigError
from ._validate import check_override_key as check_override_key
from ._validate import from_dict as from_dict
from ._validate import load_config as load_config
from ._validate import quickstart_path as quickstart_path
from ._validate import train_size as train_size
from ._validate import unused_keys as unused_keys
from ._validate import validate as validate

__all__ = [
    "MODELS", "SWEEP_AXES", "CheckpointSettings", "ConfigError", "DataSettings", "LoggingSettings", "ModelSettings",
    "ObservableSettings", "OptimSettings", "Settings", "SweepSettings", "SymmetrySettings", "check_override_key",
    "default_config", "from_dict", "load_config", "quickstart_path", "train_size", "unused_keys", "validate",
]
