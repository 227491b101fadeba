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
    from typing import Any

    from protocols import api

    from server.runtime.config import Config
    from server.channels import Channel

__all__ = ["hookspec", "hookimpl", "pigeon_channels", "pigeon_exclude"]

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


# ---------------------------------------------------------------------------------------------
# sending


@hookspec(firstresult=True)
def pigeon_exclude(  # type: ignore[empty-body]
    identity: str, attributes: dict[str, Any], message: api.MessageSpec, version: int, config: api.ChannelConfig,
    event: dict[str, Any],
) -> str | None:
    """Whether a profile that qualified for a message is excluded by a rule (a frequency cap,
    a holdout group, a suppression list); the pipeline's last step before personalization.

    Called once per profile of every send, test sends included, and of every journey push
    (live, and in ``journeys.simulate``; ``event`` is the one the profile entered on), only
    when some plugin implements it (keep it fast: a send may ask 10,000 times a second; read
    what you need into memory beforehand). The first implementation to return a reason wins; the profile is then
    counted under ``excluded`` with that reason (AJO's name for rule exclusions is
    ``ExcludedForControlRules``), and nothing is sent to it. An implementation that raises
    excludes the profile as ``RuleError`` (logged once per send).

    Decide, do not record: the same profile may be asked again for the same send (after a
    crash, a batch not yet staged is prepared again), and a profile let through may still be
    excluded later (a missing value). A frequency cap counts what was delivered, from reports
    or its own store, not the calls to this hook.

    :param identity: the profile's first identity.
    :param attributes: its attributes (read only).
    :param message: the message being sent, and ``version`` its version.
    :param config: the message's channel configuration.
    :param event: the send's event data (for templates that use ``event``).
    :return: a reason code (letters, digits, ``_``, ``-``), or None to let the profile through.

    .. versionadded:: 0.1
    """
