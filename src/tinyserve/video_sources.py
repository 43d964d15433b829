"""Video sources: what may be opened (``SourcePolicy``) and decoding in a thread (``Decoder``).

Anything PyAV (FFmpeg) opens is a source: files, ``rtsp://`` and ``http(s)://`` URLs, a
folder of images (read in name order as one sequence) and ``/dev/video*`` devices. On a
server, sources are confined: a path must resolve (symlinks followed) inside the configured
directory, a URL must start with an allowed prefix, and a device must be named in the
allow-list. FFmpeg is held to the same rules from the inside: local sources may use only
the ``file`` protocol and plain container formats (no playlists or concat lists, which name
other files), and URL sources only network protocols.

``Decoder`` runs in its own thread (PyAV releases the GIL while decoding) and hands frames
to a callback, resized for the detector (``detector_pixels``), with the full-size grey
plane kept for crops (converted to full range only for the frames that are cropped). In
real-time mode a stream that falls behind loses its oldest waiting frames, counted in
``dropped``; in file mode the decoder waits for room instead, so every frame is processed.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from tinyserve.errors import ConfigError, Forbidden, InvalidParameter, TinyServeError

Pixels = npt.NDArray[np.uint8]
NETWORK_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# Containers that hold their own media; playlists, concat lists and the like are not here,
# since they make FFmpeg open other files.
FILE_FORMATS = (
    "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,mpegts,flv,h264,hevc,mjpeg,mpeg,ogg,"
    "image2,png_pipe,jpeg_pipe,bmp_pipe,webp_pipe,gif,rawvideo,yuv4mpegpipe,v4l2,video4linux2"
)
NETWORK_PROTOCOLS = "http,https,tcp,tls,udp,rtp,rtsp,rtsps,rtmp,crypto,httpproxy"
VIDEO_EXTRA_HINT = "video needs PyAV and a tracker: pip install 'tinyserve[video]'"


def require_video() -> None:
    """Raise a clear error when the ``video`` extra is missing."""
    try:
        import av  # noqa: F401
    except ImportError:
        raise ConfigError(VIDEO_EXTRA_HINT) from None


@dataclass(frozen=True)
class SourcePolicy:
    """Which sources may be opened. ``root=None`` and no allow-list allow anything (CLI)."""

    root: Path | None = None
    allow: tuple[str, ...] = ()
    confined: bool = True

    def check(self, source: str) -> tuple[str, dict[str, str], str | None]:
        """``(what to open, FFmpeg options, format)`` for an allowed source, else raise."""
        if not source or "\0" in source or len(source) > 2048:
            raise InvalidParameter("a stream source must be a non-empty path or URL")
        scheme = source.split(":", 1)[0].lower() if "://" in source else ""
        if scheme:
            if scheme not in NETWORK_SCHEMES:
                raise InvalidParameter(
                    f"stream URLs must use one of {', '.join(NETWORK_SCHEMES)}; got {scheme}://"
                )
            if self.confined and not any(source.startswith(p) for p in self.allow if "://" in p):
                raise Forbidden(f"{source} is not in the stream URL allow-list (--stream-allow)")
            return source, {"protocol_whitelist": NETWORK_PROTOCOLS}, None
        if source.startswith("/dev/"):
            if self.confined and source not in self.allow:
                raise Forbidden(f"device {source} is not in the stream allow-list")
            return source, {}, "v4l2"
        path = Path(source)
        if self.confined:
            if self.root is None:
                raise Forbidden(
                    "file streams are off: no stream directory is configured (--stream-dir)"
                )
            root = self.root.resolve()
            resolved = (root / path).resolve() if not path.is_absolute() else path.resolve()
            if not resolved.is_relative_to(root):
                raise Forbidden(f"{source} is outside the stream directory")
            path = resolved
        if path.is_dir():
            images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                raise InvalidParameter(f"{source} is a folder without images")
            suffix = images[0].suffix
            pattern = str(path / f"*{suffix}")
            return pattern, _file_options(pattern_type="glob"), "image2"
        if not path.is_file():
            raise InvalidParameter(f"{source} does not exist")
        return str(path), _file_options(), None


def _file_options(**extra: str) -> dict[str, str]:
    return {"protocol_whitelist": "file", "format_whitelist": FILE_FORMATS, **extra}


@dataclass(slots=True)
class Frame:
    """One decoded frame: its number (from 1), detector input and full-size grey plane."""

    index: int
    decoded_at: float  # time.perf_counter() when it left the decoder
    pixels: Pixels  # [H, W, 3] at the detector's input size
    plane: Pixels  # [height, width] full-size grey plane as decoded (see ``luma``)
    width: int
    height: int
    image: Any = None  # the av.VideoFrame, kept only when annotated output is wanted
    limited: bool = False  # ``plane`` is video "limited range" luma (black 16, white 235)
    _luma: Pixels | None = None

    @property
    def luma(self) -> Pixels:
        """The full-size grey plane in full range (0-255), converted on first use.

        Most frames need no crop, so the conversion is left to the frames that do.
        """
        if self._luma is None:
            if self.limited:
                import cv2

                # OpenCV's table lookup: a fifth of numpy's indexing by the table.
                self._luma = np.asarray(cv2.LUT(self.plane, _LIMITED_TO_FULL), dtype=np.uint8)
            else:
                self._luma = self.plane
        return self._luma


@dataclass
class DecoderStats:
    decoded: int = 0
    dropped: int = 0
    error: str | None = None
    finished: bool = False
    source_fps: float | None = None
    width: int = 0
    height: int = 0


@dataclass
class Decoder:
    """Decodes ``source`` in a thread into a bounded queue of frames.

    ``realtime``: frames are paced at the source rate (a file plays as a camera would) and,
    when the queue is full, the oldest waiting frame is dropped. Otherwise the decoder
    blocks until there is room.
    """

    source: str
    size: tuple[int, int]  # detector input (width, height)
    policy: SourcePolicy = field(default_factory=SourcePolicy)
    realtime: bool = False
    fps: float | None = None  # pace (real time) or sample to this rate; None: the source's
    queue_size: int = 8
    keep_images: bool = False
    max_frames: int | None = None
    # FFmpeg's decoding threads. 1 decodes in this thread only: each stream has a thread
    # of its own already, and frame threads delay every frame by one frame per thread,
    # with no gain measured on the 640x480 test videos. 0 lets FFmpeg choose (for large
    # frames).
    threads: int = 1
    # FFmpeg's H.264/HEVC deblocking filter smooths block edges for the eye; skipping it
    # cuts about a fifth of the decode (1.4 -> 1.1 ms a 640x480 frame here), with no loss
    # measured on the scene videos' detection, tracking or track classes. It runs anyway
    # when ``keep_images`` is set, for the frames that people see.
    deblock: bool = False
    on_frame: Callable[[], None] | None = None  # called (from the thread) after each put
    stats: DecoderStats = field(default_factory=DecoderStats)

    def __post_init__(self) -> None:
        self._queue: deque[Frame] = deque()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._target = self.policy.check(self.source)  # refuse early, before any thread

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"decode-{self.source}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def get(self) -> Frame | None:
        """The oldest waiting frame, or None when none is waiting."""
        with self._cond:
            if not self._queue:
                return None
            frame = self._queue.popleft()
            self._cond.notify_all()
            return frame

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def done(self) -> bool:
        return self.stats.finished and not self._queue

    def _put(self, frame: Frame) -> None:
        with self._cond:
            if self.realtime:
                while len(self._queue) >= self.queue_size:
                    self._queue.popleft()
                    self.stats.dropped += 1
            else:
                while len(self._queue) >= self.queue_size and not self._stop.is_set():
                    self._cond.wait(0.1)
            self._queue.append(frame)
        if self.on_frame is not None:
            self.on_frame()

    def _run(self) -> None:
        try:
            self._decode()
        except TinyServeError as exc:
            self.stats.error = exc.message
        except Exception as exc:  # FFmpeg errors of any kind end this stream only
            self.stats.error = f"cannot decode {self.source}: {type(exc).__name__}: {exc}"
        finally:
            self.stats.finished = True
            if self.on_frame is not None:
                self.on_frame()

    def _decode(self) -> None:
        import av

        target, options, fmt = self._target
        try:
            container = av.open(target, format=fmt, options=options, timeout=10.0)
        except Exception as exc:
            raise InvalidParameter(f"cannot open {self.source}: {exc}") from exc
        with container:
            if not container.streams.video:
                raise InvalidParameter(f"{self.source} has no video stream")
            stream = container.streams.video[0]
            # Frames that people will see (annotated output, the live view) keep it.
            configure_decoding(stream, self.threads, self.deblock or self.keep_images)
            rate = float(stream.average_rate) if stream.average_rate else None
            self.stats.source_fps = rate
            step = 1.0 / self.fps if self.fps else (1.0 / rate if rate else 1.0 / 30)
            started = time.perf_counter()
            next_at = 0.0  # seconds of stream time of the next frame to keep
            index = 0
            for decoded in container.decode(stream):
                if self._stop.is_set():
                    return
                t = float(decoded.time) if decoded.time is not None else index * step
                if self.fps and rate and self.fps < rate - 1e-6:
                    if t + 1e-6 < next_at:
                        continue  # sampled down to --fps
                    next_at += step
                index += 1
                if self.realtime:  # a file plays at its own pace, like a camera
                    delay = started + (index - 1) * step - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                self.stats.width, self.stats.height = decoded.width, decoded.height
                width, height = self.size  # the selector may change it while running
                plane, limited = _grey_plane(decoded)
                frame = Frame(
                    index=index,
                    decoded_at=time.perf_counter(),
                    pixels=detector_pixels(decoded, width, height),
                    plane=plane,
                    width=decoded.width,
                    height=decoded.height,
                    image=decoded if self.keep_images else None,
                    limited=limited,
                )
                self.stats.decoded += 1
                self._put(frame)
                if self.max_frames is not None and index >= self.max_frames:
                    return


# Video luma is "limited range" (black 16, white 235) unless the format says full range:
# stretched to 0-255, as grey images (and so the classifier's training data) are.
_LIMITED_TO_FULL = np.clip((np.arange(256) - 16) * 255.0 / 219.0 + 0.5, 0, 255).astype(np.uint8)


def configure_decoding(stream: Any, threads: int = 1, deblock: bool = False) -> None:
    """Set a PyAV video stream up for decoding as ``Decoder`` does (see its fields)."""
    stream.thread_type = "AUTO"
    stream.codec_context.thread_count = threads
    if not deblock:
        stream.codec_context.options = {"skip_loop_filter": "all"}


def detector_pixels(decoded: Any, width: int, height: int) -> Pixels:
    """The frame as RGB at the detector's input size.

    A limited-range 4:2:0 frame (what H.264 cameras and files carry) is shrunk plane by
    plane, then converted to RGB once, at the small size, by OpenCV: about a fifth of the
    cost of FFmpeg's scaler, which converts to RGB as it filters (0.2 against 1.0-1.5 ms a
    640x480 frame here). Other formats go through FFmpeg.
    """
    planes = _i420_planes(decoded) if width % 2 == 0 and height % 2 == 0 else None
    if planes is None:
        return np.asarray(
            decoded.to_ndarray(width=width, height=height, format="rgb24", interpolation="AREA"),
            dtype=np.uint8,
        )
    import cv2

    half = (width // 2, height // 2)
    y, u, v = (
        _shrink(plane, w, h)
        for plane, (w, h) in zip(planes, ((width, height), half, half), strict=True)
    )
    i420 = np.concatenate((y.ravel(), u.ravel(), v.ravel())).reshape(height * 3 // 2, width)
    return np.asarray(cv2.cvtColor(i420, cv2.COLOR_YUV2RGB_I420), dtype=np.uint8)


def _i420_planes(decoded: Any) -> tuple[Pixels, Pixels, Pixels] | None:
    """The Y, U and V planes of a limited-range yuv420p frame (views), else None."""
    if decoded.format.name != "yuv420p" or _full_range(decoded):
        return None
    if decoded.width % 2 or decoded.height % 2:
        return None
    w, h = decoded.width, decoded.height
    return (
        _plane_view(decoded.planes[0], w, h),
        _plane_view(decoded.planes[1], w // 2, h // 2),
        _plane_view(decoded.planes[2], w // 2, h // 2),
    )


def _plane_view(plane: Any, width: int, height: int) -> Pixels:
    """A decoded plane as a ``height`` x ``width`` array: a view of the decoder's buffer,
    which is reused for later frames (copy what must outlive the frame)."""
    data = np.frombuffer(plane, dtype=np.uint8).reshape(plane.height, plane.line_size)
    return data[:height, :width]


def _full_range(decoded: Any) -> bool:
    """Whether a YUV frame's luma is full range (0-255) rather than video's 16-235."""
    return bool(
        decoded.format.name.startswith("yuvj") or int(getattr(decoded, "color_range", 1) or 1) == 2
    )


def _shrink(plane: Pixels, width: int, height: int) -> Pixels:
    """``plane`` at ``width`` x ``height``: an area filter for whole-number factors or more
    than a halving (no aliasing), bilinear for the gentler in-between (area is slow there)."""
    import cv2

    h, w = plane.shape
    if (w, h) == (width, height):
        return plane
    whole = w % width == 0 and h % height == 0
    gentle = w < 2 * width and h < 2 * height
    method = cv2.INTER_LINEAR if gentle and not whole else cv2.INTER_AREA
    return np.asarray(cv2.resize(plane, (width, height), interpolation=method), dtype=np.uint8)


def _grey_plane(decoded: Any) -> tuple[Pixels, bool]:
    """The full-size grey plane and whether it is limited range.

    For YUV frames that is a copy of the Y plane itself (no colour conversion; a copy since
    the plane is the decoder's buffer, reused for later frames).
    """
    if decoded.format.name in ("yuv420p", "yuvj420p", "yuv422p", "yuv444p", "nv12"):
        luma = _plane_view(decoded.planes[0], decoded.width, decoded.planes[0].height)
        return np.array(luma, copy=True), not _full_range(decoded)
    return np.asarray(decoded.to_ndarray(format="gray"), dtype=np.uint8), False


def check_sources(policy: SourcePolicy, sources: Sequence[str]) -> None:
    """Raise for the first refused source (before anything starts)."""
    for source in sources:
        policy.check(source)


def default_stream_root() -> Path | None:
    value = os.environ.get("TINYSERVE_STREAM_DIR")
    return Path(value) if value else None
