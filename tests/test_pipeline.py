"""The sending pipeline's store ops (server/_pipeline.py) on a real LMDB store: staging moves the
cursor with the outbox entries; settling removes them and adds the batch's outcomes, never
touching the cursor. The pipeline end to end is in test_campaigns.py and test_outbox.py."""

from __future__ import annotations

import msgspec
import trio

from protocols import api
from server._pipeline import ExecutionRecord, Outcomes, settle_batch, stage_batch
from server._store import ProfileStore
from server.channels import DeliveryResult

_encoder = msgspec.msgpack.Encoder()


async def test_settling_a_batch_adds_its_outcomes_and_keeps_the_stored_cursor(tmp_path):
    store = ProfileStore(tmp_path / "d", clock=lambda: 1)
    execution = "00112233aabbccdd"
    staged = ExecutionRecord(execution=execution, message="cart", version=1, audience="true", after=b"p-0500", batches=2,
                             result=api.SendResult(execution=execution, message="cart", version=1, profiles=500,
                                                   targeted=500, sent=50, delivered=50))
    keys = [bytes.fromhex(execution) + b"\x00\x00\x00\x01" + i.to_bytes(4, "big") for i in range(3)]
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        await store.write(stage_batch, _encoder.encode(staged), execution, [(k, b"entry") for k in keys])
        outcomes = Outcomes()
        for result in (DeliveryResult(status="sent"), DeliveryResult(status="invalid", reason="BadDeviceToken"),
                       DeliveryResult(status="failed", reason="TooManyRequests")):
            outcomes.count(result)
        await store.write(settle_batch, outcomes, execution, keys[:2])
        with store.env.begin() as txn:
            stored = msgspec.msgpack.decode(txn.get(bytes.fromhex(execution), db=store._dbs["executions"]), type=ExecutionRecord)
            left = [key for key, _ in txn.cursor(db=store._dbs["outbox"])]
        assert (stored.after, stored.batches, stored.result.profiles, stored.result.targeted) == (b"p-0500", 2, 500, 500)
        assert (stored.result.sent, stored.result.delivered, stored.result.bounced) == (53, 51, 1)
        assert stored.result.failed == {"BadDeviceToken": 1, "TooManyRequests": 1}
        assert left == keys[2:]
        await store.write(settle_batch, None, execution, keys[2:])  # the execution ended
        with store.env.begin() as txn:
            assert txn.get(bytes.fromhex(execution), db=store._dbs["executions"]) is None
            assert list(txn.cursor(db=store._dbs["outbox"])) == []
        store.request_stop()
