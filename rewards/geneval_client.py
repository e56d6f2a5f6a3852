"""Client for a GenEval scoring server running elsewhere (``python -m rewards.geneval_server``).

Useful on clusters where the detector lives in its own environment or on its own GPU. Requests use the safe
JSON + PNG wire format (:mod:`rewards.geneval_wire`). Connection failures, timeouts and 5xx answers are
retried with exponential backoff; a 4xx answer (bad request) is not, since repeating it cannot help.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Sequence

from rewards.base import RewardError
from rewards.geneval_rules import GenEvalResult, validate_metadata
from rewards.geneval_wire import decode_response, encode_request


class GenEvalClient:
    """Scores images on a remote server; same ``score(images, metadata)`` interface as the local scorer."""

    def __init__(
        self,
        url: str,
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        batch_size: int = 16,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise RewardError(f"geneval: server url must start with http:// or https://, got {url!r}")
        self.url = url.rstrip("/")
        self.timeout = float(timeout)
        self.retries = max(0, int(retries))
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.batch_size = max(1, int(batch_size))

    def health(self) -> dict:
        with urllib.request.urlopen(self.url + "/health", timeout=self.timeout) as resp:
            return json.loads(resp.read().decode("utf-8"))

    def score(self, images: Sequence, metadata: Sequence[dict]) -> list[GenEvalResult]:
        for i, meta in enumerate(metadata):
            validate_metadata(meta, where=f"metadata[{i}]")
        results: list[GenEvalResult] = []
        for start in range(0, len(images), self.batch_size):
            chunk_images = list(images[start : start + self.batch_size])
            body = encode_request(chunk_images, list(metadata[start : start + self.batch_size]))
            results.extend(decode_response(self._post(body), expected=len(chunk_images)))
        return results

    def _post(self, body: bytes) -> bytes:
        last_error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.max_backoff, self.backoff * 2 ** (attempt - 1)))
            request = urllib.request.Request(
                self.url + "/score", data=body, method="POST", headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                    return resp.read()
            except urllib.error.HTTPError as exc:
                message = _error_message(exc)
                if exc.code < 500:
                    raise RewardError(
                        f"geneval server {self.url} rejected the request ({exc.code}): {message}"
                    ) from None
                last_error = f"HTTP {exc.code}: {message}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
                last_error = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
        raise RewardError(
            f"geneval server {self.url} failed after {self.retries + 1} attempts ({last_error}). Is it running? "
            f"Start one with: python -m rewards.geneval_server --host 0.0.0.0 --port PORT, or use "
            f"reward_models.geneval.backend='local'."
        )


def _error_message(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read().decode("utf-8")).get("error", exc.reason))
    except Exception:
        return str(exc.reason)
