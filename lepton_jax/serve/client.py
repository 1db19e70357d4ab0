"""A small KServe v2 client for a ``lepton-jax serve`` server (httpx), synchronous and asynchronous.

    from lepton_jax.serve.client import Client
    with Client("http://127.0.0.1:8000", token=None) as client:
        client.wait_ready(timeout_s=60)
        out = client.infer("digits", images)      # {"class": (N,), "probabilities": (N, C)}
        client.infer("diabetes", rows, input_name="features")   # other input arrays: name them
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import numpy as np

from lepton_jax.errors import LeptonError


class ServerError(LeptonError):
    """The server refused or failed a request: HTTP status and the server's message."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message = status, message


def infer_request(rows: np.ndarray, input_name: str = "image", request_id: str | None = None) -> dict[str, Any]:
    """A KServe v2 inference request body for ``rows`` (N, ...) as FP32."""
    rows = np.asarray(rows, np.float32)
    body: dict[str, Any] = {"inputs": [{"name": input_name, "shape": list(rows.shape), "datatype": "FP32",
                                        "data": rows.reshape(-1).tolist()}]}
    if request_id is not None:
        body["id"] = request_id
    return body


def parse_response(response: httpx.Response) -> dict[str, Any]:
    """Outputs of a v2 inference response as arrays (``class``, ``probabilities``), or :class:`ServerError`."""
    body = _json_or_error(response)
    out: dict[str, Any] = {"model_name": body.get("model_name"), "model_version": body.get("model_version"),
                           "id": body.get("id")}
    for output in body["outputs"]:
        out[output["name"]] = np.asarray(output["data"]).reshape(output["shape"])
    return out


def _json_or_error(response: httpx.Response) -> Any:
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code >= 400:
        message = body.get("error") if isinstance(body, dict) else response.text
        raise ServerError(response.status_code, str(message))
    return body


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


class Client:
    """Blocking client; reuses one HTTP connection pool."""

    def __init__(self, url: str, *, token: str | None = None, timeout_s: float = 30.0):
        self.http = httpx.Client(base_url=url, headers=_headers(token), timeout=timeout_s)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def live(self) -> bool:
        return self.http.get("/v2/health/live").status_code == 200

    def ready(self) -> bool:
        return self.http.get("/v2/health/ready").status_code == 200

    def wait_ready(self, timeout_s: float = 60.0, poll_s: float = 0.1) -> None:
        """Polls readiness until ``timeout_s``; raises :class:`TimeoutError` if it never comes."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if self.ready():
                    return
            except httpx.TransportError:
                pass
            time.sleep(poll_s)
        raise TimeoutError(f"server not ready after {timeout_s} s")

    def metadata(self, model: str) -> dict[str, Any]:
        return _json_or_error(self.http.get(f"/v2/models/{model}"))

    def infer(self, model: str, rows: np.ndarray, request_id: str | None = None,
              input_name: str = "image") -> dict[str, Any]:
        """``input_name``: the model's input (``GET /v2/models/NAME``): ``image``, ``features``, ``signal``."""
        return parse_response(self.http.post(f"/v2/models/{model}/infer",
                                             json=infer_request(rows, input_name, request_id=request_id)))

    def metrics(self) -> str:
        response = self.http.get("/metrics")
        if response.status_code >= 400:
            _json_or_error(response)
        return response.text


class AsyncClient:
    """The same calls for asyncio code (e.g. many concurrent requests from one thread)."""

    def __init__(self, url: str, *, token: str | None = None, timeout_s: float = 30.0, max_connections: int = 100):
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self.http = httpx.AsyncClient(base_url=url, headers=_headers(token), timeout=timeout_s, limits=limits)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()

    async def infer(self, model: str, rows: np.ndarray, request_id: str | None = None,
                    input_name: str = "image") -> dict[str, Any]:
        response = await self.http.post(f"/v2/models/{model}/infer",
                                        json=infer_request(rows, input_name, request_id=request_id))
        return parse_response(response)
