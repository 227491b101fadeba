from protocols import api
from protocols.trio_client import open_client


async def test_in_process_server_answers_health(client):
    health = await client.call(api.GetHealth())
    assert health.status == "serving"


async def test_child_process_server_answers_and_stops_cleanly(server_process):
    async with open_client(server_process.address) as c:
        assert (await c.call(api.GetHealth())).status == "serving"
    assert server_process.stop() == 0
