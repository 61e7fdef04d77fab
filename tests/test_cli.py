"""The commands as a user runs them: real processes, real broker, real trained models."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from retrain_server.synth import family_of

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("module", ["agent.cli", "retrain_server.cli"])
def test_help_works(module):
    r = run(module, "--help")
    assert r.returncode == 0 and "usage" in r.stdout


def test_bad_config_file_is_one_line_and_exit_2(tmp_path):
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("broker:\n  port: seventeen\nagent_id: a/b\n")
    r = run("agent.cli", "run", "--config", str(cfg))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "configuration error" in lines[0]
    assert "broker.port must be an integer" in lines[0] and "broker.host is required" in lines[0]


def test_bad_broker_flag(tmp_path):
    r = run("agent.cli", "run", "--broker", "localhost:notaport", "--agent-id", "a", "--parameters", "p",
            "--allow-unsigned")
    assert r.returncode == 2 and "--broker" in r.stderr


def test_unsigned_parameters_are_refused_without_the_flag(trained, tmp_path):
    import shutil

    params = tmp_path / "params"
    shutil.copytree(trained.parameters, params)
    (params / "manifest.sig").unlink()
    r = run("agent.cli", "run", "--broker", "127.0.0.1:1", "--agent-id", "a", "--parameters", str(params),
            "--public-key", str(trained.public_key))
    assert r.returncode == 3 and "unsigned" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_train_writes_the_seed_layout_signed(trained):
    doc = json.loads((trained.parameters / "manifest.json").read_text())
    files = set(doc["files"])
    for name in ("tfidf_vectorizer.pkl", "knn_model.pkl", "df_items.pkl", "tag_matrix.pkl",
                 "co_purchase_dict.pkl"):
        assert f"guest_model/{name}" in files
    for name in ("two_tower_model_quantized.onnx", "user_lookup.npy", "context_lookup.npy",
                 "item_lookup.npy", "item_embeddings.npy"):
        assert f"member_model/{name}" in files
    assert set(doc["models"]) == {"guest", "member"}
    # blend weights were calibrated on this model: units x its own score unit
    serving = json.loads((trained.parameters / "member_model" / "member_meta.json").read_text())["serving"]
    assert serving["score_unit"] > 0
    assert serving["repeat_weight"] == pytest.approx(serving["repeat_units"] * serving["score_unit"], rel=1e-4)
    assert serving["co_weight"] == pytest.approx(serving["co_units"] * serving["score_unit"], rel=1e-4)


def test_train_keeps_a_checkpoint_for_fine_tuning_outside_the_bundle(trained):
    import numpy as np

    from retrain_server.member import load_checkpoint

    ckpt = trained.parameters.with_name(trained.parameters.name + ".checkpoint")
    assert ckpt.is_dir()
    doc = json.loads((trained.parameters / "manifest.json").read_text())
    assert not any("checkpoint" in f for f in doc["files"])  # not shipped to baskets
    state = load_checkpoint(ckpt)
    shipped = np.load(trained.parameters / "member_model" / "user_lookup.npy")
    assert state.user_lookup.tolist() == shipped.tolist()
    emb = np.load(trained.parameters / "member_model" / "item_embeddings.npy")
    assert np.allclose(state.item_embeddings(), emb, atol=1e-6)


def test_item_embeddings_are_column_major_and_served_from_the_mapping(trained, tmp_path):
    """The export writes item_embeddings.npy column-major (the edge's matrix-vector product reads
    it ~35 % faster); an installed (mapped) version serves exactly that mapping, no private copy,
    and scores equal the row-major product."""
    import mmap
    import shutil

    from agent.bundle import load_public_key
    from agent.recommenders.base import RecommendRequest
    from agent.registry import load_snapshot

    path = trained.parameters / "member_model" / "item_embeddings.npy"
    with open(path, "rb") as fh:
        assert b"'fortran_order': True" in fh.read(128)
    emb = np.load(path)
    assert emb.flags.f_contiguous and emb.dtype == np.float32
    installed = shutil.copytree(trained.parameters, tmp_path / "v1")
    for p in installed.rglob("*"):
        if p.is_file():
            p.chmod(0o444)
    snap = load_snapshot(installed, load_public_key(trained.public_key), map_files=True)
    served = snap.member.item_embeddings_
    assert served.flags.f_contiguous and not served.flags.owndata
    base = served
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(base.obj if isinstance(base, memoryview) else base, mmap.mmap)
    req = RecommendRequest(cart=tuple(snap.member.item_ids_[:3].tolist()), user_id=trained.member_id)
    vec = snap.member.user_vector(req)
    np.testing.assert_allclose(snap.member.score_parts(req).two_tower, np.ascontiguousarray(emb) @ vec,
                               rtol=1e-5, atol=1e-5)
    # bundles written before (row-major) are served without a copy too; a strided view is made contiguous
    from agent.recommenders.member import MemberRecommender

    md = installed / "member_model"
    row_major = np.ascontiguousarray(emb)
    wide = np.zeros((emb.shape[0], 2 * emb.shape[1]), np.float32)
    wide[:, ::2] = emb
    for given, copied in ((row_major, False), (wide[:, ::2], True)):
        rec = MemberRecommender((md / "two_tower_model_quantized.onnx").read_bytes(),
                                np.load(md / "user_lookup.npy").tolist(), np.load(md / "context_lookup.npy").tolist(),
                                snap.member.item_ids_, given)
        assert np.shares_memory(rec.item_embeddings_, given) is not copied
        assert rec.item_embeddings_.flags.c_contiguous or rec.item_embeddings_.flags.f_contiguous
        np.testing.assert_allclose(rec.score_parts(req).two_tower, row_major @ vec, rtol=1e-5, atol=1e-5)


def test_train_refuses_missing_inputs_and_keys(tmp_path, trained):
    r = run("retrain_server.cli", "train", "--products", str(tmp_path / "nope.csv"), "--purchases",
            str(trained.data / "purchase_history.jsonl"), "--out", str(tmp_path / "p"),
            "--signing-key", str(trained.signing_key))
    assert r.returncode != 0 and "no such file" in r.stderr
    r = run("retrain_server.cli", "train", "--products", str(trained.data / "products.csv"), "--purchases",
            str(trained.data / "purchase_history.jsonl"), "--out", str(tmp_path / "p"))
    assert r.returncode != 0 and "--signing-key is required" in r.stderr


def test_train_reports_bad_rows(tmp_path, trained):
    bad = tmp_path / "purchases.jsonl"
    bad.write_text('{"session_id": "s1", "id": "1"}\n{"session_id": "s1", "id": "2", "age": "old"}\n')
    r = run("retrain_server.cli", "train", "--products", str(trained.data / "products.csv"),
            "--purchases", str(bad), "--out", str(tmp_path / "p"), "--signing-key", str(trained.signing_key))
    assert r.returncode == 2 and "row 2" in r.stderr and "age" in r.stderr


def _client(broker, protocol=mqtt.MQTTv5):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:8]}", protocol=protocol)
    c.on_socket_open = lambda client, userdata, sock: sock.setsockopt(6, 1, 1)
    c.connect(broker.host, broker.port)
    c.loop_start()
    return c


def test_agent_process_serves_guests_and_members_over_mqtt(trained, mqtt_broker, topic_prefix):
    """`basket-agent run` with flags only: guest -> guest model, member -> member model."""
    agent = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "--broker", f"{mqtt_broker.host}:{mqtt_broker.port}",
         "--prefix", topic_prefix, "--agent-id", "cli-test", "--parameters", str(trained.parameters),
         "--public-key", str(trained.public_key), "--http-port", "0"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    inbox: queue.Queue = queue.Queue()
    c = _client(mqtt_broker)
    c.on_message = lambda client, userdata, msg: inbox.put((msg.topic, msg.payload))
    c.subscribe([(f"{topic_prefix}/basket/+/recommendations", 1), (f"{topic_prefix}/agent/cli-test/status", 1)])
    try:
        deadline = time.monotonic() + 60
        while True:
            assert agent.poll() is None, agent.stderr.read()
            topic, payload = inbox.get(timeout=deadline - time.monotonic())
            if topic.endswith("/status") and json.loads(payload)["state"] == "online":
                status = json.loads(payload)
                break
        assert status["models"]["member"] == status["models"]["guest"]

        def ask(basket, event):
            c.publish(f"{topic_prefix}/basket/{basket}/cart", json.dumps(event), qos=1)
            while True:
                topic, payload = inbox.get(timeout=10)
                if f"/basket/{basket}/" in topic and payload:
                    return json.loads(payload)

        cart = trained.family_items(4)[:3]
        guest = ask("g1", {"event_id": "g1-1", "cart": cart})
        assert guest["model"] == "guest" and guest["user_id"] == "guest"
        assert sum(family_of(p) in (4, 5) for p in guest["recommendations"]) >= 8
        member = ask("m1", {"event_id": "m1-1", "cart": cart, "wishlist": trained.family_items(9)[:1],
                            "user": {"user_id": trained.member_id, "gender": 0, "age": 41}})
        assert member["model"] == "member" and member["user_id"] == trained.member_id
        assert len(member["recommendations"]) == 10
        assert not set(member["recommendations"]) & set(cart + trained.family_items(9)[:1])
        assert member["model_version"] == status["models"]["member"]
    finally:
        agent.terminate()
        agent.wait(10)
        c.loop_stop()
    assert agent.returncode == 0


def test_member_model_beats_chance_on_planted_tastes(trained):
    """Members' own favourite families rank above others for the trained model (a quality check)."""
    from agent.bundle import load_public_key
    from agent.recommenders.base import RecommendRequest
    from agent.registry import load_snapshot

    snap = load_snapshot(trained.parameters, load_public_key(trained.public_key))
    log = trained.store.purchases
    hits = total = 0
    for uid in sorted(set(u for u in log.user_ids.tolist() if u))[:30]:
        fams = [family_of(p) for p, u in zip(log.product_ids.tolist(), log.user_ids.tolist()) if u == uid]
        top_fams = {f for f, _ in sorted(((f, fams.count(f)) for f in set(fams)), key=lambda x: -x[1])[:4]}
        recs = snap.member.recommend(RecommendRequest(user_id=uid, top_k=10))
        hits += sum(family_of(p) in top_fams for p in recs)
        total += len(recs)
    # 4 of 20 families is 20 % by chance.
    assert hits / total > 0.5, hits / total
    assert np.isfinite(snap.member.item_embeddings_).all()


def test_bad_flags_are_one_line_errors(trained, tmp_path):
    common = ["--broker", "127.0.0.1:1", "--agent-id", "a", "--parameters", str(trained.parameters),
              "--public-key", str(trained.public_key)]
    r = run("agent.cli", "run", *common, "--prefix", "a//b")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "prefix" in r.stderr
    r = run("agent.cli", "run", *common, "--http-port", "99999")
    assert r.returncode == 2 and "http.port" in r.stderr
    r = run("retrain_server.cli", "keygen", "--out", "/proc/no-such-dir")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    r = run("retrain_server.cli", "train", "--products", str(trained.data / "products.csv"), "--purchases",
            str(trained.data / "purchase_history.jsonl"), "--out", str(tmp_path / "p"), "--epochs", "0",
            "--signing-key", str(trained.signing_key))
    assert r.returncode != 0 and "--epochs" in r.stderr


def test_http_port_in_use_is_a_clean_error(trained, mqtt_broker, topic_prefix):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = run("agent.cli", "run", "--broker", f"{mqtt_broker.host}:{mqtt_broker.port}", "--prefix", topic_prefix,
                "--agent-id", "a", "--parameters", str(trained.parameters), "--public-key", str(trained.public_key),
                "--http-port", str(port))
    assert r.returncode == 1 and "could not listen" in r.stderr
    assert "Traceback" not in r.stderr
