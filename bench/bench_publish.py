"""What publishing an answer costs the agent: paho's ``publish()`` against the MQTT write lane.

One ``agent.mqtt.MqttClient`` on a private Mosquitto, its network loop run by this
thread as the agent's worker runs it (a pass after every 16 answers, as at
saturation). Each round publishes ``--answers`` QoS 1 retained answers of 600 bytes
to 200 basket topics and waits for every PUBACK, first through paho
(``fast_lane = False``), then through the write lane; CPU time of this process per
answer, PUBACK handling included. Rounds alternate so both see the same minutes.
Run: ``.venv/bin/python bench/bench_publish.py``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
from common import ROOT, print_table, write_json

sys.path.insert(0, str(ROOT / "scripts"))
from brokers import MosquittoBroker

from agent.mqtt import MqttClient, NetworkLoop

PAYLOAD = b"x" * 600
TOPICS = [f"bench-publish/basket/b-{i:04d}/recommendations" for i in range(200)]


def one_round(client: MqttClient, loop: NetworkLoop, lane: bool, n: int) -> float:
    """CPU microseconds per answer, its PUBACK included."""
    client.fast_lane = lane
    written = client.fast_written
    t0 = time.process_time()
    for i in range(n):
        client.publish(TOPICS[i % len(TOPICS)], PAYLOAD, 1, True)
        if i % 16 == 15:
            loop.run_once(0.0)
    if not loop.run_until(lambda: not client._client._out_messages, 30):
        raise RuntimeError("PUBACKs missing after 30 s")
    cpu = time.process_time() - t0
    lane_used = client.fast_written - written
    if lane_used != (n if lane else 0):
        raise RuntimeError(f"the write lane took {lane_used} of {n} answers (expected {n if lane else 0})")
    return cpu / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--answers", type=int, default=20_000, help="answers per round")
    ap.add_argument("--rounds", type=int, default=4, help="alternating rounds of each")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-publish-") as tmp:
        broker = MosquittoBroker(Path(tmp) / "mosquitto")
        broker.start()
        loop = NetworkLoop(threaded=False)
        client = MqttClient("127.0.0.1", broker.port, client_id=f"bench-publish-{uuid.uuid4().hex[:6]}", loop=loop)
        try:
            client.start()
            if not loop.run_until(lambda: client.connected, 10):
                raise RuntimeError("not connected")
            one_round(client, loop, True, 2_000)  # warm-up
            paho_us, lane_us = [], []
            for _ in range(args.rounds):
                paho_us.append(one_round(client, loop, False, args.answers))
                lane_us.append(one_round(client, loop, True, args.answers))
        finally:
            client.stop()
            broker.stop()
    rows = [{"path": name, "rounds_us": [round(v, 1) for v in vals], "median_us": round(float(np.median(vals)), 1)}
            for name, vals in (("paho publish()", paho_us), ("write lane", lane_us))]
    print_table(f"agent CPU per published answer, its PUBACK included ({args.answers} answers a round, "
                "600-byte payloads, QoS 1, retained)", ["path", "median us", "rounds us"],
                [[r["path"], r["median_us"], " / ".join(map(str, r["rounds_us"]))] for r in rows])
    write_json("publish", {"answers_per_round": args.answers, "payload_bytes": len(PAYLOAD), "rows": rows})


if __name__ == "__main__":
    main()
