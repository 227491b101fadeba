"""The Pigeon server: supervised Trio actors around an LMDB profile store.

Layout: private modules hold the code (``_app`` the server, ``_supervisor`` and ``_actor`` the
runtime, ``_store`` the LMDB store, ``_ingest`` ingestion, ``_rpc`` the socket protocol,
``_services`` the methods, ``_cli`` the command line); this module publishes what other code
may rely on. Plugin authors use `hookimpl`, `server.hookspecs` (the hooks) and
`server.channels` (what a channel is).
"""

from ._actor import Actor as Actor
from ._actor import Future as Future
from ._app import VERSION as VERSION
from ._app import Server as Server
from ._app import serve as serve
from ._config import Config as Config
from ._config import load_config as load_config
from ._errors import ActorCrashed as ActorCrashed
from ._errors import ActorError as ActorError
from ._errors import AlreadyExists as AlreadyExists
from ._errors import ConfigError as ConfigError
from ._errors import FailedPrecondition as FailedPrecondition
from ._errors import InvalidArgument as InvalidArgument
from ._errors import MailboxClosed as MailboxClosed
from ._errors import NotFound as NotFound
from ._errors import ResourceExhausted as ResourceExhausted
from ._errors import RestartIntensityExceeded as RestartIntensityExceeded
from ._errors import SchemaError as SchemaError
from ._errors import ServerError as ServerError
from ._errors import StorageError as StorageError
from ._supervisor import ChildSpec as ChildSpec
from ._supervisor import Restart as Restart
from ._supervisor import Supervisor as Supervisor
from ._plugins import Plugins as Plugins
from ._supervisor import SupervisorOptions as SupervisorOptions
from .hookspecs import hookimpl as hookimpl

__all__ = [
    "Actor",
    "Future",
    "VERSION",
    "Server",
    "serve",
    "Config",
    "load_config",
    "ActorCrashed",
    "ActorError",
    "AlreadyExists",
    "ConfigError",
    "FailedPrecondition",
    "InvalidArgument",
    "MailboxClosed",
    "NotFound",
    "ResourceExhausted",
    "RestartIntensityExceeded",
    "SchemaError",
    "ServerError",
    "StorageError",
    "ChildSpec",
    "Restart",
    "Supervisor",
    "SupervisorOptions",
    "Plugins",
    "hookimpl",
]
