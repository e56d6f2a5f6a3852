"""A small GenEval scoring server: ``python -m rewards.geneval_server --port 18085``.

Wraps the in-process scorer (:mod:`rewards.geneval_detector`) behind stdlib ``http.server`` so a detector on
one node (or in its own environment) can serve training and eval jobs elsewhere through
:class:`rewards.geneval_client.GenEvalClient`. Requests are JSON + base64 PNG (:mod:`rewards.geneval_wire`);
nothing received is ever unpickled. Scoring is serialised with a lock (one model, one device); ``/health``
answers while a batch is being scored.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from mrlora.cli import add_version_flag, main_entry
from rewards.geneval_rules import GenEvalMetadataError
from rewards.geneval_wire import WireError, decode_request, encode_error, encode_response

log = logging.getLogger("rewards.geneval_server")
DEFAULT_PORT = 18085
MAX_BODY_BYTES = 512 * 1024 * 1024


class GenEvalServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, scorer, description: str = "") -> None:
        self.scorer = scorer
        self.description = description
        self.score_lock = threading.Lock()
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class _Handler(BaseHTTPRequestHandler):
    server: GenEvalServer
    protocol_version = "HTTP/1.1"

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        if self.path.rstrip("/") == "/health":
            self._send(200, json.dumps({"status": "ok", "scorer": self.server.description}).encode())
        else:
            self._send(404, encode_error(f"unknown path {self.path!r}; use POST /score or GET /health"))

    def do_POST(self) -> None:  # noqa: N802
        if self.path.rstrip("/") != "/score":
            self._send(404, encode_error(f"unknown path {self.path!r}; use POST /score"))
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._send(411, encode_error("Content-Length header required"))
            return
        if length > MAX_BODY_BYTES:
            self._send(413, encode_error(f"request of {length} bytes exceeds {MAX_BODY_BYTES}; send smaller batches"))
            return
        body = self.rfile.read(length)
        try:
            images, metadata = decode_request(body)
            with self.server.score_lock:
                results = self.server.scorer.score(images, metadata)
        except (WireError, GenEvalMetadataError) as exc:
            self._send(400, encode_error(str(exc)))
            return
        except Exception as exc:  # report, keep serving
            log.exception("scoring failed")
            self._send(500, encode_error(f"{type(exc).__name__}: {exc}"))
            return
        self._send(200, encode_response(results))

    def log_message(self, format: str, *args) -> None:  # route access logs through logging
        log.info("%s %s", self.address_string(), format % args)


def make_server(scorer, host: str = "127.0.0.1", port: int = DEFAULT_PORT, description: str = "") -> GenEvalServer:
    """Bind a server for ``scorer`` (port 0 picks a free port; read it from ``server.url``)."""
    return GenEvalServer((host, port), scorer, description)


def main(argv: list[str] | None = None) -> int:
    from rewards.geneval_rules import COUNTING_THRESHOLD, PARTIAL_CREDITS, THRESHOLD

    parser = argparse.ArgumentParser(prog="python -m rewards.geneval_server", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 to serve other nodes)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to bind; 0 picks a free one")
    parser.add_argument("--detector", default=None, help="Mask2Former COCO-instance model dir or hub id")
    parser.add_argument("--clip", default=None, help="CLIP model dir or hub id for colour classification")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--batch-size", type=int, default=8, help="detector batch size")
    parser.add_argument("--threshold", type=float, default=THRESHOLD, help="detection score threshold")
    parser.add_argument(
        "--counting-threshold",
        type=float,
        default=COUNTING_THRESHOLD,
        help="detection score threshold for counting prompts",
    )
    parser.add_argument(
        "--partial-credit",
        default="reward_server",
        choices=PARTIAL_CREDITS,
        help="training score rule: reward_server (as published) or clipped (see rewards.geneval_rules)",
    )
    parser.add_argument("--cache-dir", default=None, help="Hugging Face cache dir holding prefetched models")
    add_version_flag(parser)
    args = parser.parse_args(argv)
    from rewards.base import RewardError
    from rewards.builtin import DEFAULT_GENEVAL_CLIP, DEFAULT_GENEVAL_DETECTOR

    try:
        from rewards.hub import resolve_model

        # Resolve first: a missing model is reported before torch/transformers are imported.
        detector = resolve_model(
            args.detector or DEFAULT_GENEVAL_DETECTOR,
            reward="geneval",
            purpose="Mask2Former detector",
            cache_dir=args.cache_dir,
        )
        clip = resolve_model(
            args.clip or DEFAULT_GENEVAL_CLIP, reward="geneval", purpose="CLIP colour model", cache_dir=args.cache_dir
        )
        from rewards.geneval_detector import load_scorer
        from rewards.hub import resolve_device

        scorer = load_scorer(
            detector,
            clip,
            resolve_device(args.device),
            batch_size=args.batch_size,
            threshold=args.threshold,
            counting_threshold=args.counting_threshold,
            cache_dir=args.cache_dir,
            partial_credit=args.partial_credit,
        )
        server = make_server(scorer, args.host, args.port, description=f"detector={detector} clip={clip}")
    except OSError as exc:  # e.g. the port is taken
        raise RewardError(f"cannot start the GenEval server on {args.host}:{args.port}: {exc}") from exc
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    print(f"GenEval server listening on {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    main_entry(main, prog="rewards.geneval_server")
