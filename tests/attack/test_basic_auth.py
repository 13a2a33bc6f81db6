"""Attack 6: basic auth as a user oracle and as a denial of service.

Before: an existing user took a bcrypt check (~200 ms), a missing one 1 ms, so one request
told which users exist; and 40 concurrent wrong passwords queued 8.7 s of bcrypt ahead of a
valid scrape.  Now unknown users are checked against a dummy hash of the same cost, right
answers are remembered briefly, and beyond a few pending checks the answer is 429.
The agent's app runs in-process on loopback.
"""

from __future__ import annotations

import asyncio
import base64
import statistics
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bcrypt

from probe.agent_config import load_config
from probe.daemon import AUTH_MAX_PENDING, Agent, BasicAuth
from tests.test_agent_ops import serve_app, write_config

COST = 10  # ~60 ms a check: the gap to a dictionary lookup is still 50x or more


def header(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_an_unknown_user_costs_a_bcrypt_check_like_a_known_one() -> None:
    """A timing attack needs a timing test: the two medians are within 2x of each other
    (before: about 200x apart).  Checked directly, with nothing else in the thread."""
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(COST)).decode()
    with ThreadPoolExecutor(1) as pool:
        auth = BasicAuth({"admin": hashed}, pool)

        def median_s(value: str) -> float:
            times = []
            for _ in range(5):
                started = time.perf_counter()
                assert auth.password_ok(value) is False
                times.append(time.perf_counter() - started)
            return statistics.median(times)

        known, unknown = median_s(header("admin", "wrong")), median_s(header("nobody", "x"))
    assert unknown > known / 2, (known, unknown)
    assert auth.password_ok(header("admin", "s3cret")) is True


async def test_a_flood_of_wrong_passwords_neither_delays_a_valid_scrape_nor_queues_up(
    tmp_path: Path,
) -> None:
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(COST)).decode()
    web_cfg = f'web: {{basic_auth_users: {{admin: "{hashed}"}}}}'
    path = write_config(tmp_path / "agent.yaml", 9, 9, extra=web_cfg)
    agent = Agent(load_config(path), str(path))
    runner, port = await serve_app(agent)
    finished: list[str] = []

    def get(who: str, value: str) -> int:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
        request.add_header("Authorization", value)
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                status = int(r.status)
        except urllib.error.HTTPError as err:
            status = err.code
        finished.append(who)
        return status

    loop = asyncio.get_running_loop()
    clients = ThreadPoolExecutor(41)  # 40 truly concurrent wrong passwords and one scrape
    try:
        assert await asyncio.to_thread(get, "valid", header("admin", "s3cret")) == 200
        finished.clear()
        flood = [
            loop.run_in_executor(clients, get, f"wrong{i}", header("admin", "x")) for i in range(40)
        ]
        await asyncio.sleep(0.2)  # the flood is in
        valid = await loop.run_in_executor(clients, get, "valid", header("admin", "s3cret"))
        assert valid == 200
        statuses = await asyncio.gather(*flood)
    finally:
        clients.shutdown()
        await runner.cleanup()
        await agent.stop()
    # The valid scrape was answered from the cache while the flood was still being checked.
    assert finished.index("valid") < len(finished) - 1, finished
    assert set(statuses) == {401, 429}, statuses
    assert statuses.count(401) <= 40 - 1 and statuses.count(429) >= 40 - 4 * AUTH_MAX_PENDING
