"""Images as they travel through the harness: encoded bytes, sent as base64 `data:` URIs.

Images are kept encoded (the bytes stored in the dataset) and only turned into a data URI when a
request is sent, so a run never holds more decoded images than it has requests in flight.
"""

from __future__ import annotations

import base64
import hashlib
import io
from functools import cached_property
from pathlib import Path
from typing import Any

from pixtral.errors import ImageError



def _sniff_mime(data: bytes) -> str | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


class EncodedImage:
    """One image as encoded bytes plus its MIME type (PNG, JPEG, GIF or WebP)."""

    def __init__(self, data: bytes, mime: str, where: str = "image"):
        self.data = data
        self.mime = mime
        self.where = where  # names the dataset file/row/field in error messages

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "image") -> EncodedImage:
        if not data:
            raise ImageError(f"{where}: image is empty (0 bytes)")
        mime = _sniff_mime(data)
        if mime is not None:
            return cls(data, mime, where)
        # Another format (BMP, TIFF, ...): re-encode losslessly as PNG so any endpoint accepts it.
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                buf = io.BytesIO()
                img.save(buf, format="PNG")
        except Exception as exc:  # PIL raises many types for bad data
            raise ImageError(f"{where}: not a readable image ({exc})") from exc
        return cls(buf.getvalue(), "image/png", where)

    @classmethod
    def from_file(cls, path: Path, where: str | None = None) -> EncodedImage:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ImageError(f"{where or path}: cannot read image file {path} ({exc.strerror})") from exc
        return cls.from_bytes(data, where=where or str(path))

    @classmethod
    def from_cell(cls, cell: Any, base_dir: Path, where: str) -> EncodedImage:
        """An image as stored by Hugging Face `datasets`: a `{"bytes", "path"}` struct, raw bytes or a path."""
        if isinstance(cell, dict):
            if cell.get("bytes"):
                return cls.from_bytes(cell["bytes"], where)
            if cell.get("path"):
                return cls.from_file(base_dir / cell["path"], where)
            raise ImageError(f"{where}: image has neither bytes nor path")
        if isinstance(cell, (bytes, bytearray)):
            return cls.from_bytes(bytes(cell), where)
        if isinstance(cell, str) and cell:
            return cls.from_file(base_dir / cell, where)
        raise ImageError(f"{where}: no image (found {type(cell).__name__})")

    @cached_property
    def size(self) -> tuple[int, int]:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(self.data)) as img:
                return img.size
        except Exception as exc:
            raise ImageError(f"{self.where}: {self.mime} image of {len(self.data)} bytes is not readable ({exc})") from exc

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def data_uri(self) -> str:
        return f"data:{self.mime};base64,{base64.b64encode(self.data).decode('ascii')}"

    def describe(self) -> dict[str, Any]:
        """What the per-item log records instead of the pixels."""
        width, height = self.size
        return {"mime": self.mime, "width": width, "height": height, "bytes": len(self.data), "sha256": self.sha256[:16]}

    def blank_like(self) -> EncodedImage:
        """A white PNG of the same size (for `--blank-images`)."""
        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", self.size, (255, 255, 255)).save(buf, format="PNG")
        return EncodedImage(buf.getvalue(), "image/png", self.where)


def decode_data_uri(uri: str) -> bytes:
    """The bytes of a base64 `data:` URI (used by tests and scripted judges)."""
    header, _, payload = uri.partition(",")
    if not header.startswith("data:") or ";base64" not in header:
        raise ImageError(f"not a base64 data URI: {uri[:40]}...")
    return base64.b64decode(payload)
