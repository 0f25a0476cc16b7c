"""An HTTP server for a model: post a portrait and a speech clip, get the talking-face mp4.

    python -m vasa_jax.serve [--model DIR | --face_workdir W1 --motion_workdir W2] \
        [--host 127.0.0.1] [--port 8000] [--max_mb 64] [--dtype bfloat16]

    curl -s localhost:8000/health
    curl -s -F image=@face.png -F audio=@speech.wav -F gaze=15,0 -F emotion=happy \
        localhost:8000/generate -o out.mp4

POST /generate takes multipart/form-data: `image` (any image file) and `audio` (any audio
file ffmpeg or soundfile reads) as files; as text fields `align` (auto | face | none, as
sample.py's --align), `allow_silence` (true/false) and any control of
`inference.Controls.from_text` (gaze "THETA,PHI", distance, emotion, guidance
"audio=0.5,gaze=1", steps, seed, head, head_amplitude, lip_only). It answers 200 with
video/mp4 (H.264 + AAC, as sample.py writes) and the headers X-Frames, X-Duration,
X-Generate-Seconds; bad input answers 400 with {"error": "..."} (one line, as the commands
print it), a body over --max_mb 413. GET /health answers {"status": "ok", "image_size",
"fps", "model"}.

The model is loaded and compiled once, at start-up (a warm-up request, so the first user
does not wait for compilation); requests are served one generation at a time (one
accelerator), while /health answers during a generation. Binds to 127.0.0.1 by default: it
has no authentication; put it behind your own proxy to expose it.
"""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import http.server
import json
import os
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Mapping
from typing import Any

import numpy as np

from vasa_jax import audio as audio_lib
from vasa_jax import cli, inference, video

ALIGN_MODES = ("auto", "face", "none")


class BadRequest(ValueError):
    """The request's fault: HTTP `status` with a one-line message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def parse_form(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """multipart/form-data -> {field name: (file name or None, bytes)} (BadRequest)."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise BadRequest(f"POST /generate wants multipart/form-data (curl -F), got "
                         f"{content_type or 'no Content-Type'!r}")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    if not message.is_multipart():
        raise BadRequest("the multipart/form-data body could not be parsed")
    fields = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            fields[name] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return fields


def _decode_image(data: bytes) -> np.ndarray:
    import cv2

    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if image is None:
        raise BadRequest("field image is not an image file (png, jpg, ...)")
    return np.ascontiguousarray(image[..., ::-1])


def _decode_audio(data: bytes, allow_silence: bool) -> np.ndarray:
    if not data:
        raise BadRequest("field audio is empty")
    with tempfile.NamedTemporaryFile(suffix=".audio") as f:
        f.write(data)
        f.flush()
        try:
            return audio_lib.load_audio(f.name, inference.SAMPLE_RATE,
                                        allow_silence=allow_silence)
        except audio_lib.AudioError as e:  # the message names the temporary file: drop it
            raise BadRequest("field audio: " + str(e).replace(f.name, "audio")) from None


class Generator:
    """A pipeline behind a lock: form fields -> mp4 bytes, one generation at a time."""

    def __init__(self, pipe: inference.Pipeline, name: str):
        self.pipe, self.name = pipe, name
        self._lock = threading.Lock()

    def __call__(self, fields: Mapping[str, tuple[str | None, bytes]]) -> tuple[bytes, dict]:
        """Returns (mp4 bytes, {"frames", "duration", "seconds"}); BadRequest for bad input."""
        missing = [k for k in ("image", "audio") if k not in fields]
        if missing:
            raise BadRequest(f"missing form field(s) {', '.join(missing)} (curl -F "
                             "image=@face.png -F audio=@speech.wav)")
        text = {k: v.decode("utf-8", "replace").strip() for k, (_, v) in fields.items()
                if k not in ("image", "audio")}
        align = text.pop("align", "") or "auto"
        if align not in ALIGN_MODES:
            raise BadRequest(f"align must be one of {ALIGN_MODES}, got {align!r}")
        try:
            allow_silence = inference.parse_bool(text.pop("allow_silence", "") or "false")
            controls = inference.Controls.from_text(text)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        image = _decode_image(fields["image"][1])
        waveform = _decode_audio(fields["audio"][1], allow_silence)
        with self._lock:
            t0 = time.perf_counter()
            try:
                portrait, _ = inference.crop_portrait(image, self.pipe.image_size, align,
                                                      name=fields["image"][0] or "image")
            except ValueError as e:  # no face found, ...
                raise BadRequest(str(e)) from None
            frames = (f for w in self.pipe.windows(portrait, waveform, controls)
                      for f in w.frames)
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "out.mp4")
                count = video.write_video(path, frames, self.pipe.fps, waveform,
                                          inference.SAMPLE_RATE)
                with open(path, "rb") as f:
                    data = f.read()
            seconds = time.perf_counter() - t0
        return data, {"frames": count, "duration": count / self.pipe.fps, "seconds": seconds}

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.name, "image_size": self.pipe.image_size,
                "fps": self.pipe.fps, "busy": self._lock.locked()}


def make_handler(generator: Generator, max_bytes: int) -> type:
    """The request handler class of a server around `generator`."""

    class Handler(http.server.BaseHTTPRequestHandler):
        server_version = "vasa_jax"

        def _json(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802 - the http.server hook's name
            if self.path.split("?")[0] == "/health":
                self._json(200, generator.health())
            else:
                self._json(404, {"error": f"no such path {self.path!r} (GET /health, POST "
                                          "/generate)"})

        def do_POST(self):  # noqa: N802
            if self.path.split("?")[0] != "/generate":
                self._json(404, {"error": f"no such path {self.path!r} (POST /generate)"})
                return
            try:
                length = int(self.headers.get("Content-Length") or -1)
                if length < 0:
                    raise BadRequest("a Content-Length header is required", 411)
                if length > max_bytes:
                    raise BadRequest(f"the request is {length / 2**20:.1f} MB, over the "
                                     f"server's --max_mb {max_bytes / 2**20:g}", 413)
                fields = parse_form(self.headers.get("Content-Type", ""),
                                    self.rfile.read(length))
                data, info = generator(fields)
            except BadRequest as e:
                self._json(e.status, {"error": " ".join(str(e).split())})
                return
            except Exception as e:  # noqa: BLE001 - a bug: logged with its traceback, 500
                traceback.print_exc()
                self._json(500, {"error": f"internal error: {type(e).__name__}: {e}"})
                return
            self.send_response(200)
            self.send_header("Content-Type", "video/mp4")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("X-Frames", str(info["frames"]))
            self.send_header("X-Duration", f"{info['duration']:.3f}")
            self.send_header("X-Generate-Seconds", f"{info['seconds']:.3f}")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format, *args):  # noqa: A002 - http.server's signature
            print(f"{self.address_string()} {format % args}", file=sys.stderr, flush=True)

    return Handler


def warm_up(pipe: inference.Pipeline) -> float:
    """Compiles the model's functions with a one-second request; returns its seconds."""
    t = np.arange(inference.SAMPLE_RATE) / inference.SAMPLE_RATE
    tone = (0.3 * np.sin(2 * np.pi * 200 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    image = np.full((pipe.image_size, pipe.image_size, 3), 128, np.uint8)
    t0 = time.perf_counter()
    for _ in pipe.windows(image, tone, inference.Controls()):
        pass
    return time.perf_counter() - t0


def make_server(pipe: inference.Pipeline, host: str = "127.0.0.1", port: int = 8000, *,
                max_mb: float = 64.0, name: str = "") -> http.server.ThreadingHTTPServer:
    """A threading HTTP server (not started: `serve_forever()`); port 0 picks a free port
    (`server.server_address`)."""
    handler = make_handler(Generator(pipe, name), int(max_mb * 2**20))
    return http.server.ThreadingHTTPServer((host, port), handler)


def main(argv=None) -> int:
    p = cli.ArgumentParser(prog="python -m vasa_jax.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="", help="a model export (default: the built-in demo "
                   "model unless --face_workdir is given)")
    p.add_argument("--face_workdir", default="", help="a stage-1 training run")
    p.add_argument("--motion_workdir", default="", help="a stage-2 training run")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    p.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (default): this machine "
                   "only; 0.0.0.0: every interface (no authentication!)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max_mb", type=float, default=64.0, help="the largest request body")
    p.add_argument("--no_warmup", action="store_true", help="skip the compiling request")
    args = p.parse_args(argv)

    def body() -> int:
        t0 = time.perf_counter()
        pipe = inference.Pipeline.open(args.model, args.face_workdir, args.motion_workdir,
                                       dtype=args.dtype)
        name = args.model or args.face_workdir or "demo"
        server = make_server(pipe, args.host, args.port, max_mb=args.max_mb, name=name)
        print(f"model loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        if not args.no_warmup:
            print(f"compiled in {warm_up(pipe):.1f} s (a warm-up request)", file=sys.stderr)
        host, port = server.server_address[:2]
        print(f"serving {name} on http://{host}:{port} (POST /generate, GET /health)",
              file=sys.stderr, flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
        return 0

    return cli.run_guarded(body, status=2)


if __name__ == "__main__":
    sys.exit(main())
