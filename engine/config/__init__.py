"""Startup-kit and MMAR config files (Clara Train 3.1 forms) parsed into dataclasses."""

# Every problem names the file, the dotted key and what is expected. A file is read whole before
# anything is refused, so one error lists every problem of the file (``ConfigProblems``), and the
# ``*_problems`` functions return them as a list (``fltui check-config``). One module per file
# kind; ``common`` holds what they share, and a module imports only the ones below it.

from __future__ import annotations

from engine.config.common import (
    COMPRESSIONS,
    NOT_IMPLEMENTED,
    SITE_NAME,
    TENSORFLOW_ONLY,
    ComponentSpec,
    ConfigError,
    ConfigProblems,
    clara_base,
    existing_files,
    load_json,
    refusal,
)
from engine.config.environment import (
    ENVIRONMENT_FILE,
    LOCAL_ENVIRONMENT_FILE,
    MMAREnvironment,
    environment_problems,
    load_environment,
    local_environment_file,
)
from engine.config.kit import (
    CLARA_REQUEST_PROCESSORS,
    REQUEST_PROCESSORS,
    ClientKitConfig,
    ServerEndpoint,
    client_kit_problems,
    load_client_kit,
    read_client_kit,
)
from engine.config.mmar import (
    MMARClientConfig,
    load_mmar_client_config,
    mmar_client_problems,
    read_mmar_client_config,
)
from engine.config.server import (
    DEFAULT_MAX_N_ITER,
    MAX_N_ITER_MARGIN,
    ServerConfig,
    load_server_config,
    read_server_config,
    server_problems,
)

__all__ = [
    "CLARA_REQUEST_PROCESSORS",
    "COMPRESSIONS",
    "DEFAULT_MAX_N_ITER",
    "ENVIRONMENT_FILE",
    "LOCAL_ENVIRONMENT_FILE",
    "MAX_N_ITER_MARGIN",
    "NOT_IMPLEMENTED",
    "REQUEST_PROCESSORS",
    "SITE_NAME",
    "TENSORFLOW_ONLY",
    "ClientKitConfig",
    "ComponentSpec",
    "ConfigError",
    "ConfigProblems",
    "MMARClientConfig",
    "MMAREnvironment",
    "ServerConfig",
    "ServerEndpoint",
    "clara_base",
    "client_kit_problems",
    "environment_problems",
    "existing_files",
    "load_client_kit",
    "load_environment",
    "load_json",
    "load_mmar_client_config",
    "load_server_config",
    "local_environment_file",
    "mmar_client_problems",
    "read_client_kit",
    "read_mmar_client_config",
    "read_server_config",
    "refusal",
    "server_problems",
]
