"""edgert: an inference runtime for Jetson-class edge devices.

    import edgert
    rt = edgert.Runtime("device_configs/cpu-dev.yaml")
    m = rt.load("tasks.edgepack")
"""
__version__ = "0.1.0"   # first: edgert.control reads it while the package imports

from .config import DeviceConfig
from .errors import (BudgetExceeded, ConfigError, EdgertError, IncompatibleModels, InputMismatch,
                     PackCorrupt, UnknownTask, UnsupportedModel)
from .pack.hf_import import CheckpointIncomplete
from .runtime import Runtime
from .control import Client, RemoteError, ServiceUnavailable

__all__ = ["Runtime", "Client", "RemoteError", "ServiceUnavailable", "DeviceConfig",
           "EdgertError", "BudgetExceeded", "ConfigError", "IncompatibleModels",
           "InputMismatch", "PackCorrupt", "UnknownTask", "UnsupportedModel",
           "CheckpointIncomplete", "__version__"]
