"""The books of journeys, read from a stopped (or killed) server's data folder and from the
mock FCM: what `bench.journey_crash` and `bench.chaos` check."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import lmdb
import msgspec

from plugins.fcm.mock import MockFcmProcess
from server.journeys.machine import Instance
from server.profiles.records import decode_profile

__all__ = ["left_at_kill", "read_journey_folder", "accepted_by_node"]

_instance = msgspec.msgpack.Decoder(Instance)


def _open(folder: Path) -> lmdb.Environment:
    return lmdb.open(str(folder), readonly=True, lock=False, max_dbs=64)


def _count(env: lmdb.Environment, txn: lmdb.Transaction, name: str) -> int:
    return int(txn.stat(env.open_db(name.encode(), txn=txn, create=False))["entries"])


def left_at_kill(folder: Path) -> dict[str, int]:
    """What a killed server's data folder holds: timers, outbox entries, instances."""
    env = _open(folder)
    try:
        with env.begin() as txn:
            return {name: _count(env, txn, name) for name in ("timers", "outbox", "instances")}
    finally:
        env.close()


def read_journey_folder(folder: Path, journey: str) -> dict[str, Any]:
    """A stopped server's instances of ``journey`` (sandbox default): each as (identities,
    instance), with the timers, push log entries, outbox entries and executions left."""
    env = _open(folder)
    try:
        with env.begin() as txn:
            dbs = {name: env.open_db(name.encode(), txn=txn, create=False)
                   for name in ("instances", "profiles", "timers", "push_log")}
            found = []
            for key, value in txn.cursor(db=dbs["instances"]):
                if bytes(key[8:]).decode() != journey:
                    continue
                profile = txn.get(bytes(key[:8]), db=dbs["profiles"])
                identities = [] if profile is None else list(decode_profile(profile).identities)
                found.append((identities, _instance.decode(memoryview(value)[1:])))
            timers = [bytes(k) for k, _ in txn.cursor(db=dbs["timers"]) if bytes(k[16:]).decode() == journey]
            pushes = txn.stat(dbs["push_log"])["entries"]  # every delivery settled, whoever sent it
            return {"instances": found, "timers": timers, "push_log": pushes,
                    "outbox": _count(env, txn, "outbox"), "executions": _count(env, txn, "executions")}
    finally:
        env.close()


def accepted_by_node(mock: MockFcmProcess, journey: str) -> dict[str, Counter[str]]:
    """What the provider accepted of ``journey`` 's pushes: node -> token -> times."""
    out: dict[str, Counter[str]] = {}
    for item in mock.admin.accepted():
        message = item["message"]
        tracking = json.loads(message.get("data", {}).get("_p", "{}"))
        if tracking.get("j") == journey:
            out.setdefault(tracking.get("n", ""), Counter())[message["token"]] += 1
    return out
