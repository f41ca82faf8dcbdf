"""Load images from what users send: PIL objects, paths, file://, http(s):// and data: URIs.

Every failure becomes an `ImageError` naming the image and the problem. The pixel limit is
checked from the header, before any pixel is decoded, so a decompression bomb costs nothing.
What may be loaded is a policy: the CLI reads local files; the server reads only data: URIs
unless remote images are allowed, and then never from loopback or private networks.

Decoding is bounded process-wide by the policy's `DecodeBudget`: at most `max_images` images
and `max_pixels` pixels are decoded (and preprocessed, see `Processor`) at once; the others
wait their turn. A decoded image and its preprocessing take up to about 25 bytes a pixel
(mistral-common converts to float32 at full size before it resizes), so the budget bounds the
memory a burst of large images can take; when the last large image of a burst is done, the
freed memory is handed back to the system (glibc keeps it otherwise).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import ctypes
import ctypes.util
import io
import ipaddress
import re
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urljoin, urlparse

from PIL import Image

from pixtral.errors import ImageError, ImageTooLargeError

# PIL's own decompression-bomb threshold: 1024 * 1024 * 1024 // 4 // 3 ≈ 89.5 megapixels.
DEFAULT_MAX_PIXELS = 89_478_485
TRIM_AFTER_PIXELS = 4_000_000  # return freed memory to the system after a burst with an image this large


class DecodeBudget:
    """At most `max_images` images and `max_pixels` pixels being decoded at once, across threads."""

    def __init__(self, max_pixels: int = DEFAULT_MAX_PIXELS, max_images: int = 2):
        if max_pixels < 1 or max_images < 1:
            raise ValueError(f"a decode budget needs max_pixels >= 1 and max_images >= 1, got {max_pixels}, {max_images}")
        self.max_pixels, self.max_images = max_pixels, max_images
        self.pixels = self.images = 0
        self._largest = 0  # the largest image of the current burst
        self._cond = threading.Condition()

    def __reduce__(self):
        # Pickled with a policy (data-loading workers): the default stays the receiving process's
        # default; another budget becomes one with the same limits there.
        if self is DEFAULT_BUDGET:
            return _default_budget, ()
        return DecodeBudget, (self.max_pixels, self.max_images)

    @contextlib.contextmanager
    def reserve(self, size: tuple[int, int]) -> Iterator[None]:
        """Wait until an image of `size` (width, height) fits the budget, and hold it meanwhile.
        An image larger than the whole budget runs alone."""
        pixels = min(size[0] * size[1], self.max_pixels)
        with self._cond:
            self._cond.wait_for(lambda: self.images < self.max_images and self.pixels + pixels <= self.max_pixels)
            self.pixels += pixels
            self.images += 1
            self._largest = max(self._largest, pixels)
        try:
            yield
        finally:
            with self._cond:
                self.pixels -= pixels
                self.images -= 1
                trim = self.images == 0 and self._largest >= TRIM_AFTER_PIXELS
                if self.images == 0:
                    self._largest = 0
                self._cond.notify_all()
            if trim:
                release_free_memory()


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing)."""
    if _libc is not None:
        _libc.malloc_trim(0)


def _load_libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


_libc = _load_libc()
DEFAULT_BUDGET = DecodeBudget()


def _default_budget() -> DecodeBudget:
    return DEFAULT_BUDGET


@dataclass(frozen=True)
class ImagePolicy:
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = 50 * 2**20
    allow_local_files: bool = True
    allow_remote: bool = True
    block_private_networks: bool = False  # refuse remote hosts that resolve to loopback/private ranges
    timeout_s: float = 10.0
    max_redirects: int = 3
    base_dir: Path | None = None  # relative paths resolve against this (e.g. a JSONL file's folder)
    budget: DecodeBudget = field(default=DEFAULT_BUDGET, compare=False)  # shared by every policy that names it


LOCAL_POLICY = ImagePolicy()
SERVER_POLICY = ImagePolicy(allow_local_files=False, allow_remote=False, block_private_networks=True)


def describe(source: object) -> str:
    """A short name for an image source, for error messages (data URIs are not echoed)."""
    if isinstance(source, Image.Image):
        return f"PIL image {source.size[0]}x{source.size[1]}"
    text = str(source)
    if text.startswith("data:"):
        return f"data URI ({text[:30]}…)"
    return text if len(text) <= 200 else text[:200] + "…"


def load_image(source: object, policy: ImagePolicy = LOCAL_POLICY) -> Image.Image:
    """Return a fully decoded PIL image, or raise ImageError naming the problem."""
    image, name = open_image(source, policy)
    with policy.budget.reserve(image.size):
        return decode_pixels(image, name)


def open_image(source: object, policy: ImagePolicy = LOCAL_POLICY) -> tuple[Image.Image, str]:
    """(image, its name for messages): the header read and checked against the policy, no pixel
    decoded yet (`decode_pixels` does that, under `policy.budget`)."""
    if isinstance(source, Image.Image):
        _check_pixels(source, describe(source), policy)
        return source, describe(source)
    if isinstance(source, Path):
        source = str(source)
    if not isinstance(source, str):
        raise ImageError(f"an image must be a URL, a path or a PIL image, got {type(source).__name__}")
    if not source.strip():
        raise ImageError("empty image URL")
    scheme = urlparse(source).scheme.lower()
    if scheme == "data":
        data = _decode_data_uri(source, policy)
    elif scheme in ("http", "https"):
        data = _fetch_remote(source, policy)
    elif scheme == "file" or scheme == "" or (len(scheme) == 1 and source[1:3] in (":\\", ":/")):
        data = _read_local(source, policy)
    else:
        raise ImageError(f"unsupported image URL scheme {scheme!r} in {describe(source)} (use a path, file://, http(s):// or data:)")
    name = describe(source)
    return open_image_bytes(data, name, policy), name


def open_image_bytes(data: bytes, name: str, policy: ImagePolicy = LOCAL_POLICY) -> Image.Image:
    if not data:
        raise ImageError(f"{name}: empty image data")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # PIL refuses before we see the size; its message carries the pixel count.
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(found.group(1)) / 1e6:.1f} megapixels, " if found else ""
        raise ImageTooLargeError(
            f"{name}: image is too large ({size}over the limit of {policy.max_pixels / 1e6:.1f} megapixels)"
        ) from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{name}: not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{name}: corrupt or truncated image ({exc})") from None
    _check_pixels(image, name, policy)  # header only: nothing decoded yet
    return image


def decode_pixels(image: Image.Image, name: str) -> Image.Image:
    """Decode an opened image's pixels (a no-op for an image in memory)."""
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{name}: corrupt or truncated image ({exc})") from None
    return image


def _check_pixels(image: Image.Image, name: str, policy: ImagePolicy) -> None:
    w, h = image.size
    if w <= 0 or h <= 0:
        raise ImageError(f"{name}: image has no pixels ({w}x{h})")
    if w * h > policy.max_pixels:
        raise ImageTooLargeError(
            f"{name}: image is {w}x{h} = {w * h / 1e6:.1f} megapixels, over the limit of "
            f"{policy.max_pixels / 1e6:.1f} megapixels"
        )


def _decode_data_uri(uri: str, policy: ImagePolicy) -> bytes:
    header, sep, payload = uri.partition(",")
    if not sep:
        raise ImageError("data URI has no ',' separating header and data")
    if len(payload) > policy.max_bytes * 4 // 3 + 4:
        raise ImageTooLargeError(f"data URI is larger than the limit of {policy.max_bytes} bytes")
    if ";base64" not in header.lower():
        return unquote(payload).encode("latin-1", errors="replace")
    try:
        return base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("data URI: invalid base64 data") from None


def _read_local(source: str, policy: ImagePolicy) -> bytes:
    if not policy.allow_local_files:
        raise ImageError(f"local image paths are not allowed here: {describe(source)} (send the image as a data: URI)")
    path = Path(unquote(urlparse(source).path) if source.lower().startswith("file:") else source).expanduser()
    if not path.is_absolute() and policy.base_dir is not None:
        path = policy.base_dir / path
    if not path.exists():
        raise ImageError(f"{path}: image file not found")
    if not path.is_file():
        raise ImageError(f"{path}: not a file")
    size = path.stat().st_size
    if size > policy.max_bytes:
        raise ImageTooLargeError(f"{path}: file is {size} bytes, over the limit of {policy.max_bytes}")
    return path.read_bytes()


def _check_host(url: str) -> None:
    host = urlparse(url).hostname
    if not host:
        raise ImageError(f"{url}: no host in URL")
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        raise ImageError(f"{url}: cannot resolve host {host!r}") from None
    for info in infos:
        addr = ipaddress.ip_address(info[4][0].split("%")[0])
        if (addr.is_private or addr.is_loopback or addr.is_link_local or addr.is_reserved
                or addr.is_multicast or addr.is_unspecified):
            raise ImageError(f"{url}: remote images from loopback or private addresses are not allowed ({addr})")


def _fetch_remote(url: str, policy: ImagePolicy) -> bytes:
    if not policy.allow_remote:
        raise ImageError(f"remote image URLs are not allowed here: {describe(url)} (send the image as a data: URI)")
    import httpx

    deadline = time.monotonic() + policy.timeout_s  # for the whole download, not per read
    current = url
    for _ in range(policy.max_redirects + 1):
        if policy.block_private_networks:
            _check_host(current)
        try:
            with httpx.stream("GET", current, timeout=policy.timeout_s, follow_redirects=False) as response:
                if response.is_redirect:
                    current = urljoin(current, response.headers.get("location", ""))
                    continue
                if response.status_code != 200:
                    raise ImageError(f"{url}: HTTP {response.status_code}")
                chunks, total = [], 0
                for chunk in response.iter_bytes():
                    if time.monotonic() > deadline:
                        raise ImageError(f"{url}: download took longer than {policy.timeout_s:g} s")
                    total += len(chunk)
                    if total > policy.max_bytes:
                        raise ImageTooLargeError(f"{url}: image is larger than the limit of {policy.max_bytes} bytes")
                    chunks.append(chunk)
                return b"".join(chunks)
        except httpx.TimeoutException:
            raise ImageError(f"{url}: timed out after {policy.timeout_s:g} s") from None
        except httpx.HTTPError as exc:
            raise ImageError(f"{url}: download failed ({exc})") from None
    raise ImageError(f"{url}: more than {policy.max_redirects} redirects")
