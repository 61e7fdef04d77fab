"""A tiny catalogue with a known right answer, and the agent as a real process (for kill tests).

``python tests/_agent_proc.py --port P --prefix X --agent-id A [--protocol 3.1.1]``
serves :func:`tiny_snapshot` until SIGTERM/SIGINT (or dies on SIGKILL).

Catalogue A..F; co-purchase partners: A -> B (2.0), C (1.0); B -> A (2.0), D (1.0);
C -> D; D -> E; no TF-IDF neighbours; popularity F, E, D, C, B, A. So for a guest:
cart [A] -> [B, C]; cart [A] top_k 3 -> [B, C, F]; cart [A, B] top_k 2 -> [C, D];
cart [A] wishlist [C] top_k 2 -> [B, F].

:func:`service_config` builds an :class:`agent.config.ServiceConfig` from flat keywords.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.config import BasketsConfig, BrokerConfig, ServiceConfig
from agent.recommenders.guest import GuestRecommender
from agent.registry import ModelRegistry, ModelSnapshot

ITEMS = ["A", "B", "C", "D", "E", "F"]
NAMES = {"A": "사과", "B": "바나나", "C": "우유", "D": "빵", "E": "계란", "F": "물"}
VERSION = "20260101T000000Z-test"


def tiny_snapshot() -> ModelSnapshot:
    co_n = np.array([[1, 2], [0, 3], [3, -1], [4, -1], [-1, -1], [-1, -1]])
    co_s = np.array([[2.0, 1.0], [2.0, 1.0], [1.0, 0], [1.0, 0], [0, 0], [0, 0]])
    sim_n = -np.ones((6, 1), dtype=np.int32)
    sim_s = np.zeros((6, 1), dtype=np.float32)
    guest = GuestRecommender(ITEMS, co_n, co_s, sim_n, sim_s, np.array([5, 4, 3, 2, 1, 0]))
    return ModelSnapshot(version=VERSION, guest=guest, names=NAMES)


_SECTIONS = (BrokerConfig, BasketsConfig, ServiceConfig)
#: every keyword :func:`service_config` takes
CONFIG_FIELDS = frozenset(f.name for cls in _SECTIONS for f in dataclasses.fields(cls)) - {"broker", "baskets"}


def service_config(**kw: Any) -> ServiceConfig:
    """A ServiceConfig from flat keywords (``host=``, ``port=``, ``agent_id=``, ``idle_ttl_s=``, ...): each
    goes to the section with a field of that name (BrokerConfig, BasketsConfig, ServiceConfig)."""
    parts: dict[type, dict[str, Any]] = {cls: {} for cls in _SECTIONS}
    for key, value in kw.items():
        owner = next((cls for cls in _SECTIONS if key in {f.name for f in dataclasses.fields(cls)}), None)
        if owner is None or key in ("broker", "baskets"):
            raise TypeError(f"service_config: no field {key!r}")
        parts[owner][key] = value
    return ServiceConfig(broker=BrokerConfig(**parts[BrokerConfig]), baskets=BasketsConfig(**parts[BasketsConfig]),
                         **parts[ServiceConfig])


def main() -> None:
    from agent.service import AgentService

    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--agent-id", required=True)
    p.add_argument("--protocol", default="5")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = service_config(host=a.host, port=a.port, prefix=a.prefix, agent_id=a.agent_id, protocol=a.protocol,
                            reconnect_min_s=0.1, reconnect_max_s=1.0)
    AgentService(ModelRegistry(tiny_snapshot()), config).run_forever()


if __name__ == "__main__":
    main()
