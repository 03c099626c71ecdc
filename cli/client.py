"""HTTP client for the gateway's control API (httpx).

Turns every failure into :class:`ApiError` with one line a person can act on:
an unreachable daemon, a wrong token, or the daemon's own JSON error.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx

from gateway.config import ClientConfig, load_client_config
from gateway.errors import GatewayError


def seg(value: str) -> str:
    """A name as one URL path segment: '/' and friends can't reach another route."""
    return quote(value, safe="") or "%20"


class ApiError(GatewayError):
    """The control API could not be reached or refused the request."""

    def __init__(self, message: str, *, hint: str | None = None, status: int | None = None):
        super().__init__(message, hint=hint)
        self.status = status


class ApiClient:
    def __init__(self, config: ClientConfig | None = None, *, timeout: float = 30.0) -> None:
        self.config = config or load_client_config()
        self._http = httpx.Client(
            base_url=self.config.api_url,
            headers={"Authorization": f"Bearer {self.config.token}"},
            timeout=timeout,
            trust_env=False,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Any:
        try:
            response = self._http.request(
                method,
                path,
                json=json,
                params={k: v for k, v in (params or {}).items() if v is not None},
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
            )
        except httpx.ConnectError:
            raise ApiError(
                f"cannot reach the pam gateway at {self.config.api_url}",
                hint="is `pam gateway run` running?",
            ) from None
        except httpx.TimeoutException:
            raise ApiError(
                f"the pam gateway at {self.config.api_url} did not answer in time"
            ) from None
        except httpx.HTTPError as exc:
            raise ApiError(f"talking to the pam gateway failed: {exc}") from None
        if response.status_code == 204:
            return None
        try:
            body = response.json()
        except ValueError:
            raise ApiError(
                f"the pam gateway answered HTTP {response.status_code} without JSON",
                status=response.status_code,
            ) from None
        if response.is_error:
            error = body.get("error", {}) if isinstance(body, dict) else {}
            raise ApiError(
                error.get("message") or f"HTTP {response.status_code}",
                hint=error.get("hint"),
                status=response.status_code,
            )
        return body

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params)

    def post(self, path: str, json: Any = None, **params: Any) -> Any:
        return self.request("POST", path, json=json, params=params)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)
