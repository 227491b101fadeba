"""The plugin manager: built-in plugins first, then the ``pigeon`` entry-point group.

A typed method per hook (as tox does), so the rest of the server calls
``plugins.channels(config)`` rather than ``pm.hook.pigeon_channels(config=config)``.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Mapping
from typing import Any

import pluggy

from server import hookspecs
from server.runtime.config import Config
from server.runtime.errors import ConfigError
from server.channels import Channel

__all__ = ["Plugins", "BUILTIN_PLUGINS"]

log = logging.getLogger("pigeon.plugins")

#: Modules registered before any third-party plugin, under these names.
BUILTIN_PLUGINS = {"apns": "plugins.apns", "fcm": "plugins.fcm"}


class Plugins:
    """Pigeon's plugin manager.

    Args:
        env: the environment, for ``PIGEON_DISABLED_PLUGINS`` and ``PIGEON_TRACE_PLUGINS``.
        entry_points: also load the ``pigeon`` entry-point group (tests turn it off).
        extra: more plugins to register (objects or modules), by name.
    """

    def __init__(
        self,
        *,
        env: Mapping[str, str] | None = None,
        entry_points: bool = True,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        env = os.environ if env is None else env
        self.pm = pluggy.PluginManager("pigeon")
        self.pm.add_hookspecs(hookspecs)
        for name in filter(None, (n.strip() for n in env.get("PIGEON_DISABLED_PLUGINS", "").split(","))):
            self.pm.set_blocked(name)
        for name, module in BUILTIN_PLUGINS.items():
            if not self.pm.is_blocked(name):
                self.pm.register(importlib.import_module(module), name=name)
        for name, plugin in (extra or {}).items():
            self.pm.register(plugin, name=name)
        if entry_points:
            self.pm.load_setuptools_entrypoints("pigeon")
        self.pm.check_pending()
        if env.get("PIGEON_TRACE_PLUGINS"):
            self.pm.add_hookcall_monitoring(
                lambda name, impls, kwargs: log.info("hook %s(%s) -> %s", name, ", ".join(kwargs), [i.plugin_name for i in impls]),
                lambda outcome, name, impls, kwargs: log.info("hook %s done", name),
            )

    def names(self) -> list[str]:
        return [name for name, _ in self.pm.list_name_plugin()]

    def channels(self, config: Config) -> list[Channel]:
        """Every plugin's channels; two claiming one platform is a configuration error."""
        channels: list[Channel] = [c for found in self.pm.hook.pigeon_channels(config=config) for c in found]
        claimed: dict[str, str] = {}
        for channel in channels:
            for platform in channel.platforms:
                if platform in claimed:
                    raise ConfigError(
                        f"channels {claimed[platform]!r} and {channel.name!r} both deliver to {platform!r}; "
                        "disable one with PIGEON_DISABLED_PLUGINS"
                    )
                claimed[platform] = channel.name
        return channels
