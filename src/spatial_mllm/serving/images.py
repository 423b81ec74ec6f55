"""Turning an `image_url` into a PIL image without ever doing unbounded work: sizes are checked before decoding
(the base64 length, then the pixel count in the image header before the pixels load), remote images come only
from allowed hosts over http(s), with a timeout, no redirects and a byte cap, and nothing is read from disk."""

from __future__ import annotations

import base64
import binascii
import io
import re
import urllib.error
import urllib.parse
import urllib.request
import warnings

from PIL import Image, UnidentifiedImageError

from .errors import APIError
from .settings import ServerSettings

DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.I)


def load_image(url: str, settings: ServerSettings, param: str) -> Image.Image:
    """The RGB image at `url` (data: or, if allowed, http(s)); APIError 400/413 naming `param` otherwise."""
    url = url.strip()
    if url[:5].lower() == "data:":
        return decode_image(_data_url_bytes(url, settings, param), settings, param)
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        return decode_image(fetch_image_bytes(url, settings, param), settings, param)
    shown = url if len(url) <= 60 else url[:57] + "..."
    raise APIError(
        400, f"image URL {shown!r} is neither a data:image/...;base64 URL nor http(s); files on the server are "
        "never read", param
    )


def _data_url_bytes(url: str, settings: ServerSettings, param: str) -> bytes:
    match = DATA_URL.match(url)
    if match is None:
        raise APIError(400, "malformed data URL: expected data:image/<format>;base64,<data>", param)
    mime = (match.group("mime") or "").lower()
    if not mime.startswith("image/"):
        raise APIError(400, f"data URL of type {mime or 'text/plain'!r}: only image/* is accepted", param)
    if not match.group("b64"):
        raise APIError(400, "data URL is not base64-encoded (expected ;base64,)", param)
    payload = url[match.end():]
    # The decoded size is known from the length: refuse before decoding anything.
    decoded_size = len(payload) * 3 // 4
    if decoded_size > settings.max_image_bytes:
        raise APIError(
            413, f"image of about {decoded_size} bytes is over this server's limit of {settings.max_image_bytes}", param
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise APIError(400, f"invalid base64 in the image data URL ({err})", param) from None


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise APIError(400, f"image URL redirects ({code}) and redirects are not followed", None)


def fetch_image_bytes(url: str, settings: ServerSettings, param: str) -> bytes:
    """Download at most `max_image_bytes` from an allowed host; refused when remote images are off."""
    host = (urllib.parse.urlsplit(url).hostname or "").lower()
    if not settings.allowed_media_domains:
        raise APIError(
            400, "remote image URLs are disabled on this server (send the image as a data: URL, or start the server "
            "with --allowed-media-domains)", param
        )
    if host not in settings.allowed_media_domains:
        raise APIError(400, f"image host {host!r} is not in this server's --allowed-media-domains", param)
    opener = urllib.request.build_opener(_NoRedirects)
    try:
        with opener.open(url, timeout=settings.media_fetch_timeout_s) as response:
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > settings.max_image_bytes:
                raise APIError(
                    413, f"image of {declared} bytes is over this server's limit of {settings.max_image_bytes}", param
                )
            data = response.read(settings.max_image_bytes + 1)
    except APIError as err:
        err.param = err.param or param
        raise
    except urllib.error.HTTPError as err:
        raise APIError(400, f"image URL answered HTTP {err.code}", param) from None
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise APIError(400, f"image URL could not be fetched ({reason})", param) from None
    if len(data) > settings.max_image_bytes:
        raise APIError(413, f"image is over this server's limit of {settings.max_image_bytes} bytes", param)
    return data


def decode_image(data: bytes, settings: ServerSettings, param: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own pixel cap decides
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise APIError(413, f"image is over Pillow's decompression-bomb limit ({err})", param) from None
    except (UnidentifiedImageError, OSError) as err:
        raise APIError(400, f"the image data is not an image this server can decode ({type(err).__name__})", param)
    width, height = image.size
    if width * height > settings.max_image_pixels:
        raise APIError(
            413, f"image of {width}x{height} pixels is over this server's limit of {settings.max_image_pixels} pixels",
            param,
        )
    try:
        return image.convert("RGB")  # decodes the pixels
    except (OSError, ValueError, SyntaxError) as err:
        raise APIError(400, f"the image is truncated or corrupt ({err})", param) from None


__all__ = ["decode_image", "fetch_image_bytes", "load_image"]
