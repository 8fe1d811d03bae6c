"""edgert: an inference runtime for Jetson-class edge devices.

    import edgert
    rt = edgert.Runtime("device_configs/cpu-dev.yaml")
    m = rt.load("tasks.edgepack")
"""
from .config import DeviceConfig
from .errors import (BudgetExceeded, CheckpointIncomplete, ConfigError, EdgertError,
                     IncompatibleModels, InputMismatch, PackCorrupt, UnknownTask,
                     UnsupportedModel)
from .kinds.generation import GenerateResult, Generation
from .runtime import Runtime
from .control import Client, RemoteError, ServiceUnavailable
from .version import __version__

__all__ = ["Runtime", "Client", "RemoteError", "ServiceUnavailable", "DeviceConfig",
           "EdgertError", "BudgetExceeded", "ConfigError", "IncompatibleModels",
           "InputMismatch", "PackCorrupt", "UnknownTask", "UnsupportedModel",
           "CheckpointIncomplete", "Generation", "GenerateResult", "__version__"]
