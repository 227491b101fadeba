"""The Pigeon server: supervised Trio actors around an LMDB profile store.

Layout: one package per step of the push data flow (``runtime``, ``api``, ``profiles``,
``messages``, ``delivery``, ``reports``, ``journeys``, ``cli``; README, "Layout"); this module
publishes what other code may rely on. Plugin authors use `hookimpl`, `server.hookspecs` (the hooks) and
`server.channels` (what a channel is).
"""

from server.runtime.actor import Actor as Actor
from server.runtime.actor import Future as Future
from server.runtime.app import VERSION as VERSION
from server.runtime.app import Server as Server
from server.runtime.app import serve as serve
from server.runtime.config import Config as Config
from server.runtime.config import load_config as load_config
from server.runtime.errors import ActorCrashed as ActorCrashed
from server.runtime.errors import ActorError as ActorError
from server.runtime.errors import AlreadyExists as AlreadyExists
from server.runtime.errors import ConfigError as ConfigError
from server.runtime.errors import FailedPrecondition as FailedPrecondition
from server.runtime.errors import InvalidArgument as InvalidArgument
from server.runtime.errors import MailboxClosed as MailboxClosed
from server.runtime.errors import NotFound as NotFound
from server.runtime.errors import ResourceExhausted as ResourceExhausted
from server.runtime.errors import RestartIntensityExceeded as RestartIntensityExceeded
from server.runtime.errors import SchemaError as SchemaError
from server.runtime.errors import ServerError as ServerError
from server.runtime.errors import StorageError as StorageError
from server.runtime.supervisor import ChildSpec as ChildSpec
from server.runtime.supervisor import Restart as Restart
from server.runtime.supervisor import Supervisor as Supervisor
from server.runtime.plugins import Plugins as Plugins
from server.runtime.supervisor import SupervisorOptions as SupervisorOptions
from server.hookspecs import hookimpl as hookimpl

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
