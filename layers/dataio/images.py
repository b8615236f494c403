"""Image files: decode (Pillow), encode, and Caffe's (OpenCV's) bilinear resize."""

import contextlib
import io
import os

import numpy

from brewnet.netdef import DefinitionError


# Pillow's own guard against decompression bombs (about 89 M pixels, 268 MB as BGR), which
# brewnet keeps as its documented limit: BREWNET_MAX_IMAGE_PIXELS moves it.
MAX_IMAGE_PIXELS = int(os.environ.get("BREWNET_MAX_IMAGE_PIXELS", 89_478_485))


class ImageTooLargeError(DefinitionError):
    """An image with more pixels than brewnet decodes (MAX_IMAGE_PIXELS)."""


def _pil():
    from PIL import Image, ImageOps

    # ours is checked first; Pillow's own guard is raised only where a user asked for more
    # (left alone otherwise, for the rest of the process's Pillow calls)
    if Image.MAX_IMAGE_PIXELS is not None and MAX_IMAGE_PIXELS > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    return Image, ImageOps


def decode_image(data, color=True, where="an encoded image"):
    """Decode image file bytes; color True: 3-channel BGR, False: gray, None: as stored
    (gray stays 1 channel, alpha gives BGRA), as cv::imdecode with COLOR/GRAYSCALE/UNCHANGED."""
    try:
        return _to_array(io.BytesIO(bytes(data)), color, where)
    except ImageTooLargeError:
        raise
    except (OSError, ValueError, SyntaxError) as exc:  # Pillow's errors for damaged or unknown data
        raise DefinitionError(f"{where}: cannot be decoded as an image ({type(exc).__name__})") from None


@contextlib.contextmanager
def open_image(source, where=None):
    """Pillow's Image.open, refusing an image over MAX_IMAGE_PIXELS from its header,
    before anything is decoded."""
    Image, _ = _pil()
    name = where or source
    try:
        opened = Image.open(source)
    except Image.DecompressionBombError as exc:  # over twice Pillow's limit (by default ours), it refuses first
        raise ImageTooLargeError(f"{name}: {exc}") from None
    with opened as img:
        pixels = img.size[0] * img.size[1]
        if pixels > MAX_IMAGE_PIXELS:
            raise ImageTooLargeError(f"{name}: image of {img.size[0]}x{img.size[1]} = {pixels / 1e6:.0f} M pixels is "
                                     f"over the limit of {MAX_IMAGE_PIXELS / 1e6:.0f} M (resize it first, or set "
                                     "BREWNET_MAX_IMAGE_PIXELS)")
        yield img


def _to_array(source, color, where=None):
    _, ImageOps = _pil()
    with open_image(source, where) as img:
        if color is False and img.format == "JPEG":
            img.draft("L", img.size)  # libjpeg's own gray output, as OpenCV asks for it
        img.load()
        if color is not None:  # OpenCV applies EXIF orientation except for IMREAD_UNCHANGED
            img = ImageOps.exif_transpose(img)
        if color is True:
            arr = numpy.asarray(img.convert("RGB"))[:, :, ::-1]
        elif color is False:
            arr = numpy.asarray(img.convert("L"))[:, :, None]
        else:
            mode = img.mode
            if mode in ("1", "L", "I", "I;16", "I;16B", "F"):
                arr = numpy.asarray(img.convert("L"))[:, :, None]
            elif mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
                arr = numpy.asarray(img.convert("RGBA"))[:, :, [2, 1, 0, 3]]
            else:
                arr = numpy.asarray(img.convert("RGB"))[:, :, ::-1]
    return numpy.ascontiguousarray(arr)


def read_image(path, height=0, width=0, color=True):
    """cv::imread (+ cv::resize when height and width are > 0); None when unreadable.
    An image over MAX_IMAGE_PIXELS raises ImageTooLargeError (a one-line DefinitionError)."""
    try:
        img = _to_array(path, color)
    except ImageTooLargeError:
        raise
    except (OSError, ValueError, SyntaxError):
        return None
    if height > 0 and width > 0:
        img = resize_linear(img, height, width)
    return img


def encode_image(img, ext):
    """cv::imencode('.ext', img) for an HWC BGR (or gray) uint8 image."""
    Image, _ = _pil()
    ext = ext.lower().lstrip(".")
    fmt = {"jpg": "JPEG", "jpeg": "JPEG", "jpe": "JPEG", "png": "PNG", "bmp": "BMP", "ppm": "PPM",
           "pgm": "PPM", "pbm": "PPM", "tif": "TIFF", "tiff": "TIFF", "webp": "WEBP"}.get(ext)
    if fmt is None:
        raise DefinitionError(f"cannot encode images as {ext!r}")
    pil = Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else numpy.ascontiguousarray(img[:, :, 2::-1]))
    out = io.BytesIO()
    options = {"quality": 95} if fmt == "JPEG" else {"compress_level": 1} if fmt == "PNG" else {}
    pil.save(out, format=fmt, **options)
    return out.getvalue()


def _linear_taps(src, dst):
    """OpenCV INTER_LINEAR source indices and 11-bit fixed-point weights for one axis."""
    f = ((numpy.arange(dst) + 0.5) * (src / dst) - 0.5).astype(numpy.float32)
    i = numpy.floor(f).astype(numpy.int64)
    f = f - i
    low, high = i < 0, i >= src - 1
    f[low | high] = 0
    i[low] = 0
    i[high] = src - 1
    w1 = numpy.rint(f * 2048).astype(numpy.int64)
    w0 = numpy.rint((numpy.float32(1) - f) * 2048).astype(numpy.int64)
    return i, numpy.minimum(i + 1, src - 1), w0, w1


def resize_linear(img, height, width):
    """cv::resize(img, (width, height)) with INTER_LINEAR on uint8 HWC, in OpenCV's fixed point."""
    h, w = img.shape[:2]
    if (h, w) == (height, width):
        return img
    if h == 2 * height and w == 2 * width:  # OpenCV switches to INTER_AREA for an exact halving
        s = img.astype(numpy.int32)
        s = s[0::2, 0::2] + s[1::2, 0::2] + s[0::2, 1::2] + s[1::2, 1::2]
        return ((s + 2) >> 2).astype(numpy.uint8)
    x0, x1, a0, a1 = _linear_taps(w, width)
    y0, y1, b0, b1 = _linear_taps(h, height)
    s = img.astype(numpy.int64)
    rows = s[:, x0] * a0[None, :, None] + s[:, x1] * a1[None, :, None]  # horizontal pass (int)
    r0, r1 = rows[y0] >> 4, rows[y1] >> 4
    out = (((b0[:, None, None] * r0) >> 16) + ((b1[:, None, None] * r1) >> 16) + 2) >> 2
    return numpy.clip(out, 0, 255).astype(numpy.uint8)
