"""The sending pipeline's store ops (server/_pipeline.py) on a real LMDB store: staging moves the
cursor with the outbox entries and commits the batch's report counts; settling removes them,
adds the batch's outcomes and commits their report counts, never touching the cursor. The
pipeline end to end is in test_campaigns.py, test_outbox.py and test_crashes.py."""

from __future__ import annotations

from collections import Counter

import msgspec
import pytest
import trio

from protocols import api
from server.runtime.errors import ServerError
from server.messages.outbox import ExecutionRecord, Outcomes, end_execution, settle_batch, stage_batch
from server.reports.reporting import Reporting
from server.profiles.store import ProfileStore
from server.channels import DeliveryResult

_decoder = msgspec.msgpack.Decoder(ExecutionRecord)
EXECUTION = "00112233aabbccdd"
MINUTE = 29_000_000


def _key(outcome: str, reason: str = "", platform: str = "fcm") -> tuple:
    return ("default", "cart", 1, "", "", "com.acme.app" if platform else "", platform, outcome, reason)


def _stored(store: ProfileStore) -> tuple[ExecutionRecord | None, list[bytes], Counter]:
    """The execution, the outbox's keys and the all-time report counts, as stored."""
    with store.env.begin() as txn:
        value = txn.get(bytes.fromhex(EXECUTION), db=store.default.db("executions"))
        left = [key for key, _ in txn.cursor(db=store.default.db("outbox"))]
    return None if value is None else _decoder.decode(value), left, Reporting(store).all_time("default")


def _state(**result: int) -> ExecutionRecord:
    return ExecutionRecord(execution=EXECUTION, message="cart", version=1, audience="true", after=b"p-0500", batches=2,
                           result=api.SendResult(execution=EXECUTION, message="cart", version=1, **result))


async def test_staging_and_settling_commit_the_batch_with_its_report_counts(tmp_path):
    store = ProfileStore(tmp_path / "d", clock=lambda: 1)
    keys = [bytes.fromhex(EXECUTION) + b"\x00\x00\x00\x01" + i.to_bytes(4, "big") for i in range(3)]
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        staged = Counter({_key("targeted"): 3, _key("targeted", platform=""): 1, _key("excluded", "NoConsent", ""): 1})
        await store.write(stage_batch, _state(profiles=500, targeted=500), [(k, b"entry") for k in keys], staged, MINUTE)
        record, left, counts = _stored(store)
        assert (record.after, record.batches, record.result.profiles, record.result.targeted) == (b"p-0500", 2, 500, 500)
        assert left == keys and counts == staged

        outcomes = Outcomes()
        for result in (DeliveryResult(status="sent"), DeliveryResult(status="invalid", reason="BadDeviceToken")):
            outcomes.count(result)
        settled = Counter({_key("sent"): 2, _key("delivered"): 1, _key("failed", "BadDeviceToken"): 1,
                           _key("bounced", "BadDeviceToken"): 1})
        await store.write(settle_batch, outcomes, EXECUTION, keys[:2], settled, MINUTE)
        record, left, counts = _stored(store)
        assert (record.after, record.batches, record.result.profiles, record.result.targeted) == (b"p-0500", 2, 500, 500)
        assert (record.result.sent, record.result.delivered, record.result.bounced) == (2, 1, 1)
        assert record.result.failed == {"BadDeviceToken": 1}
        assert left == keys[2:] and counts == staged + settled
        with store.env.begin() as txn:  # and the live window's minute has them too
            assert sum(1 for _ in txn.cursor(db=store.default.db("live"))) == len(staged + settled)

        # The next batch is staged with the pipeline's counts, which know nothing of that
        # settle yet (its commit was not seen): the stored outcomes stay.
        await store.write(stage_batch, _state(profiles=1000, targeted=1000), [], Counter(), MINUTE)
        record, _, _ = _stored(store)
        assert (record.result.profiles, record.result.sent, record.result.delivered) == (1000, 2, 1)
        assert record.result.failed == {"BadDeviceToken": 1}

        await store.write(end_execution, EXECUTION)
        record, left, _ = _stored(store)
        assert record is None and left == keys[2:]  # the last entry is settled on its own
        store.request_stop()


async def test_an_op_that_fails_commits_neither_the_outbox_nor_the_counts(tmp_path):
    store = ProfileStore(tmp_path / "d", clock=lambda: 1)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        key = bytes.fromhex(EXECUTION) + bytes(8)
        bad_entry = [(key, "not bytes")]  # LMDB refuses it, after the execution was put
        with pytest.raises(ServerError, match="internal error"):
            await store.write(stage_batch, _state(targeted=1), bad_entry, Counter({_key("targeted"): 1}), MINUTE)
        record, left, counts = _stored(store)
        assert (record, left, counts) == (None, [], Counter())
        store.request_stop()
