"""Shared pieces of the end-to-end server tests: a real `pagellm serve` subprocess on a free
port, its Prometheus samples, and the `client` and `auth` fixtures to talk to it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(model: str | Path, args: Sequence[str], log_path: Path,
                   startup_timeout: float = 180.0) -> Iterator[str]:
    """Runs `pagellm serve MODEL --host 127.0.0.1 --port <free> --dtype float32
    --uvicorn-log-level warning *args` and yields its base URL once /health answers 200.

    The server's output goes to `log_path`; the test fails (showing the log's tail) when the
    server exits or is not healthy within `startup_timeout` seconds. On exit the process is
    terminated (killed after 20 s). PAGELLM_API_KEY is removed from its environment so that
    only an explicit `--api-key` in `args` turns the key check on."""
    port = free_port()
    cmd = [sys.executable, "-m", "pagellm.entrypoints.cli", "serve", str(model), "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--uvicorn-log-level", "warning", *args]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               # One thread, as conftest sets for the test process: faster on a small shared machine.
               OMP_NUM_THREADS=os.environ.get("PAGELLM_TEST_THREADS", "1"))
    env.pop("PAGELLM_API_KEY", None)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + startup_timeout
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                pytest.fail(f"server did not become healthy:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.3)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def metric_samples(base: str) -> dict[str, float]:
    """The server's Prometheus samples as {'name{label="v",...}': value}, without the
    model_name label (/metrics needs no key)."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = {}
    for family in text_string_to_metric_families(httpx.get(base + "/metrics", timeout=30).text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()) if k != "model_name")
            samples[f"{s.name}{{{labels}}}"] = s.value
    return samples


def client_and_auth_fixtures(api_key: str, timeout: float) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """Module-scoped `client` (the official sync openai client for the module's `server`
    fixture, which yields {"base": url, ...}; no retries, so a failed request shows) and `auth`
    (the Authorization header carrying `api_key`) fixtures. A test module binds them to those
    names: `client, auth = client_and_auth_fixtures(API_KEY, timeout=60)`."""

    @pytest.fixture(scope="module")
    def client(server):
        import openai

        return openai.OpenAI(base_url=server["base"] + "/v1", api_key=api_key, max_retries=0, timeout=timeout)

    @pytest.fixture(scope="module")
    def auth():
        return {"Authorization": f"Bearer {api_key}"}

    return client, auth
