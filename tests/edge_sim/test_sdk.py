"""The edge SDK: a device's ``Client`` through the real gateway (uvicorn serving ``gateway_api`` with its relay on a
real Redis) to a real step loop over the tiny large model. What it streams is what the trusted bus path writes."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import httpx
import msgspec
import pytest
import uvicorn

from cogenesis.cluster.bus import CloudBus, EdgeBus
from cogenesis.cluster.redis_server import free_port
from cogenesis.core.auth import mint
from cogenesis.core.config import CloudConfig, EdgeConfig
from cogenesis.core.data import Record
from cogenesis.core.errors import AuthError, ConfigError, PrivacyViolation
from cogenesis.core.models import load_causal_lm
from cogenesis.core.protocol import SketchReply, SketchRequest, decode_json
from cogenesis.core.secrets import ENV_CLUSTER_KEY, ENV_DIR, SecretsDir
from cogenesis.deployments.engine import TransformersCloudEngine
from cogenesis.deployments.gateway import GatewayServer, gateway_api
from cogenesis.deployments.relay import GatewayRelay, connect_async
from cogenesis.deployments.step_loop import StepLoop
from cogenesis.edge_sim.client import EdgeClient
from cogenesis.edge_sim.engine import EdgeEngine
from cogenesis.edge_sim.logits import run_logits_sessions
from cogenesis.edge_sim.sdk import Client, PrivateContext, record_of

GREEDY = {"temperature": 0.0, "top_p": 1.0, "seed": 0}
INSTRUCTION = "Write a short note to a friend: about my trip to Lisbon with Marta last June"
CONTEXT = {"profile": "I am a nurse who loves sailing.", "history": [("A note", "Dear Jo, the sea was calm today.")]}
TIMEOUT_S = 30.0


def cfg(**kw) -> EdgeConfig:
    base = dict(top_k=5, max_new_tokens=12, max_prompt_tokens=512, sampling=GREEDY, step_timeout_s=TIMEOUT_S)
    return EdgeConfig(**{**base, **kw})


def _eventually(check, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not check():
        assert time.monotonic() < deadline, f"{what} did not happen within {TIMEOUT_S} s"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def models(tiny_large, tiny_small):
    return load_causal_lm(str(tiny_large)), load_causal_lm(str(tiny_small))


@pytest.fixture
def engine(models):
    (_, tok), (small, _) = models
    return EdgeEngine(small, tok, 512)


@pytest.fixture
def cloud(models, redis_url, tmp_path, monkeypatch):
    """A replica (the real step loop over the tiny large model) and a gateway in front of it; yields
    namespace(url, token(sub))."""
    for name in (ENV_DIR, ENV_CLUSTER_KEY):
        monkeypatch.delenv(name, raising=False)
    secrets = SecretsDir.create(tmp_path / "secrets")
    (large, tok), _ = models
    loop = StepLoop(TransformersCloudEngine(large, tok), CloudBus(redis_url, "r1"), threading.Lock()).start()
    config = CloudConfig(redis_url=redis_url, secrets_dir=str(secrets.path))
    relay = GatewayRelay(connect_async(redis_url), config.limits, config.gateway, gateway_id="g1")
    port = free_port()
    web = uvicorn.Server(
        uvicorn.Config(gateway_api(GatewayServer(config.model_dump(), relay=relay)), port=port, log_level="warning")
    )
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    _eventually(lambda: web.started, "the gateway's start")
    key = secrets.cluster_key()
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}", token=lambda sub="phone-1": mint(key, sub, "device"))
    web.should_exit = True
    thread.join(TIMEOUT_S)
    loop.stop()


def test_an_instruction_and_private_context_become_a_record_whose_private_part_stays_private():
    record = record_of(INSTRUCTION, CONTEXT)
    assert record.public_instruction == "Write a short note to a friend"
    assert record.task == INSTRUCTION and record.declared_public
    assert "about my trip to Lisbon with Marta last June" in record.private_fields()
    assert (
        CONTEXT["profile"] in record.private_fields() and "Dear Jo, the sea was calm today." in record.private_fields()
    )
    assert "Lisbon" not in repr(record) and "sailing" not in repr(PrivateContext.of(CONTEXT))
    dicts = record_of(INSTRUCTION, {"history": [{"title": "A note", "text": "Dear Jo"}]})
    assert dicts.history == (("A note", "Dear Jo"),)
    assert record_of(INSTRUCTION, "a profile").profile == "a profile"
    given = Record(tid="t", kind="context_aware", public_instruction="Write", task="Write")
    assert record_of("ignored", given) is given
    with pytest.raises(ConfigError):
        record_of(INSTRUCTION, {"address": "private"})
    with pytest.raises(ConfigError):
        record_of(": only details", None)


def test_generate_streams_what_the_trusted_bus_path_writes(cloud, engine, redis_url):
    with Client(cloud.url, cloud.token(), config=cfg(), engine=engine) as client:
        pieces = list(client.generate(INSTRUCTION, CONTEXT, mode="logits"))
        result = client.last_result
        again = "".join(client.generate(INSTRUCTION, CONTEXT, max_new_tokens=4))  # the connection is reused
    bus = EdgeBus(redis_url)
    try:
        (reference,) = run_logits_sessions(
            [EdgeClient(0, record_of(INSTRUCTION, CONTEXT), engine, cfg())], engine, bus, cfg()
        )
    finally:
        bus.close()
    assert result is not None and result.error is None and result.tokens > 0
    assert len(pieces) > 1  # streamed as written, not at the end
    assert "".join(pieces).strip() == result.text == reference.text
    assert result.round_trips > 1 and result.rtt_us  # every step through the gateway, timed
    assert again.strip() and len(again) <= len("".join(pieces))


def test_closing_the_stream_early_stops_the_session(cloud, engine):
    with Client(cloud.url, cloud.token(), config=cfg(max_new_tokens=40, ignore_eos=True), engine=engine) as client:
        stream = client.generate(INSTRUCTION, CONTEXT)
        first = next(stream)
        stream.close()
        assert first
        assert "".join(client.generate(INSTRUCTION, CONTEXT, max_new_tokens=3))  # usable again


def test_a_refused_token_and_a_private_instruction_raise_clear_errors(cloud, engine):
    with Client(cloud.url, "cgt1.forged.token", config=cfg(), engine=engine) as client:
        with pytest.raises(AuthError) as info:
            list(client.generate(INSTRUCTION, CONTEXT))
        assert "token" in (info.value.hint or "")
    private = {"profile": "Marta, Lisbon, last June"}
    with Client(cloud.url, cloud.token(), config=cfg(), engine=engine) as client, pytest.raises(PrivacyViolation):
        list(client.generate("Write about Marta and my trip to Lisbon last June", private))  # nothing is sent


def test_sketch_mode_asks_the_gateway_with_the_token_and_streams_the_local_writing(engine, monkeypatch):
    asked: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(request)
        req = decode_json(request.content, SketchRequest)
        reply = SketchReply(request_id=req.request_id, sketch="1. Greet\n2. Tell of the trip", tokens=9)
        return httpx.Response(200, content=msgspec.json.encode(reply), headers={"content-type": "application/json"})

    client = Client("http://gateway.invalid", "cgt1.device.token", config=cfg(), engine=engine)
    client._http = httpx.Client(transport=httpx.MockTransport(handler))
    with client:
        text = "".join(client.generate(INSTRUCTION, CONTEXT, mode="sketch"))
        result = client.last_result
    assert str(asked[0].url) == "http://gateway.invalid/v1/sketch"
    assert asked[0].headers["authorization"] == "Bearer cgt1.device.token"
    body = decode_json(asked[0].content, SketchRequest)
    assert body.instruction == "Write a short note to a friend"  # the general instruction only
    assert result is not None and result.sketch.startswith("1. Greet") and text.strip() == result.text


def test_unknown_options_and_modes_are_config_errors(engine):
    client = Client("http://gateway.invalid", "cgt1.secret.sig", config=cfg(), engine=engine)
    with pytest.raises(ConfigError):
        client.generate(INSTRUCTION, mode="stream")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        client.generate(INSTRUCTION, colour="blue")
    with pytest.raises(ConfigError):
        client.generate(INSTRUCTION, max_new_tokens=-1)
    assert "cgt1.secret.sig" not in repr(client)  # never the token
