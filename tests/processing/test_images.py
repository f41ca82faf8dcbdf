"""Image loading: every source kind, and a clear error for every kind of bad image."""

from __future__ import annotations

import base64
import http.server
import io
import struct
import threading
import zlib

import pytest
from PIL import Image

from pixtral.errors import ImageError, RequestError
from pixtral.processing import SERVER_POLICY, ImagePolicy, load_image, load_processor


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def forged_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels but that carries almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "red.png"
    path.write_bytes(png_bytes(Image.new("RGB", (40, 30), "red")))
    return path


def test_sources(image_file):
    data = base64.b64encode(image_file.read_bytes()).decode()
    for source in (str(image_file), image_file.as_uri(), f"data:image/png;base64,{data}", Image.open(image_file)):
        img = load_image(source)
        assert img.size == (40, 30)


def test_relative_path_uses_base_dir(image_file):
    assert load_image("red.png", ImagePolicy(base_dir=image_file.parent)).size == (40, 30)


@pytest.mark.parametrize("make, message", [
    (lambda p: str(p / "missing.png"), "image file not found"),
    (lambda p: _write(p / "a.png", b"this is not an image"), "not an image"),
    (lambda p: _write(p / "t.png", png_bytes(Image.new("RGB", (64, 64), "blue"))[:60]), "truncated"),
    (lambda p: _write(p / "bomb.png", forged_png(20000, 20000)), "400.0 megapixels, over the limit of 89.5 megapixels"),
    (lambda p: "data:image/png;base64,@@@not-base64@@@", "invalid base64"),
    (lambda p: "ftp://example.com/a.png", "unsupported image URL scheme 'ftp'"),
    (lambda p: "", "empty image URL"),
])
def test_bad_images_get_clear_errors(tmp_path, make, message):
    with pytest.raises(ImageError, match=message):
        load_image(make(tmp_path))


def test_pixel_limit_is_checked_before_decoding(tmp_path):
    # The forged file has a 12000x12000 header and no real pixel data: only a header check can fail it cleanly.
    path = _write(tmp_path / "big.png", forged_png(12000, 12000))
    with pytest.raises(ImageError, match="144.0 megapixels"):
        load_image(str(path))
    with pytest.raises(ImageError, match="over the limit of 0.0"):
        load_image(Image.new("RGB", (10, 10)), ImagePolicy(max_pixels=50))


def test_server_policy_refuses_local_and_remote(image_file):
    with pytest.raises(ImageError, match="local image paths are not allowed"):
        load_image(str(image_file), SERVER_POLICY)
    with pytest.raises(ImageError, match="remote image URLs are not allowed"):
        load_image("https://example.com/cat.png", SERVER_POLICY)


@pytest.fixture
def http_server(image_file):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "/red.png")
                self.end_headers()
                return
            if self.path != "/red.png":
                self.send_error(404)
                return
            body = image_file.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_remote_images_over_real_http(http_server):
    assert load_image(f"{http_server}/red.png").size == (40, 30)
    assert load_image(f"{http_server}/redirect").size == (40, 30)
    with pytest.raises(ImageError, match="HTTP 404"):
        load_image(f"{http_server}/nothing.png")
    with pytest.raises(ImageError, match="larger than the limit of 20 bytes"):
        load_image(f"{http_server}/red.png", ImagePolicy(max_bytes=20))
    private = ImagePolicy(allow_remote=True, block_private_networks=True)
    with pytest.raises(ImageError, match="loopback or private addresses are not allowed"):
        load_image(f"{http_server}/red.png", private)


def test_processor_errors_name_the_message_part(shipped_tekken, tmp_path):
    p = load_processor(shipped_tekken)
    with pytest.raises(ImageError, match=r"messages\[0\].content\[1\]: .*image file not found"):
        p.encode_chat([{"role": "user", "content": [
            {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": str(tmp_path / "x.png")}}]}])
    with pytest.raises(RequestError, match="unknown role 'robot'"):
        p.encode_chat([{"role": "robot", "content": "hi"}])
    with pytest.raises(RequestError, match="last message must be from the user"):
        p.encode_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    with pytest.raises(RequestError, match="non-empty list"):
        p.encode_chat([])
    with pytest.raises(RequestError, match="unsupported content part type 'audio'"):
        p.encode_chat([{"role": "user", "content": [{"type": "audio"}]}])


def _write(path, data: bytes):
    path.write_bytes(data)
    return path
