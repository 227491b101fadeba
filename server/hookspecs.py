"""Pigeon's plugin hooks (pluggy), grouped by lifecycle.

A plugin is a module or object with functions marked ``@hookimpl`` (``from server import
hookimpl``), registered from the ``pigeon`` entry-point group::

    [project.entry-points.pigeon]
    webpush = "pigeon_webpush.plugin"

Pigeon's own channels are plugins too, registered before third-party ones (`plugins.apns`).
Hooks are called with keyword arguments; an implementation may accept fewer arguments than
the spec names. ``PIGEON_DISABLED_PLUGINS`` (comma-separated names) blocks plugins and
``PIGEON_TRACE_PLUGINS=1`` logs every hook call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from ._config import Config
    from .channels import Channel

__all__ = ["hookspec", "hookimpl", "pigeon_channels"]

#: Marks hook specifications (Pigeon's own use).
hookspec = pluggy.HookspecMarker("pigeon")
#: Marks a plugin's hook implementations.
hookimpl = pluggy.HookimplMarker("pigeon")


# ---------------------------------------------------------------------------------------------
# delivery


@hookspec
def pigeon_channels(config: Config) -> list[Channel]:  # type: ignore[empty-body]
    """Return the delivery channels this plugin provides.

    Called once when the server starts; every plugin's channels are collected. A channel
    delivers to the push registrations of the platforms it names (`Channel.platforms`); two
    channels may not claim the same platform.

    :param config: the server's configuration (for endpoints and limits).
    :return: `server.channels.Channel` objects.

    .. versionadded:: 0.1
    """
