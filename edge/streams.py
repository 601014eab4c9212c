"""Live sources: a camera (an OpenCV index or a device path such as /dev/video0) and network streams (RTSP and
HTTP(S) MJPEG, read by OpenCV's FFmpeg backend), each watched by a watchdog that reconnects when frames stop.

    source = LiveSource("rtsp://cam.local/stream1", image_size=224, settings=SourceSettings(stream=...),
                        stop=stop_event, log=print)
    for frame in source: ...          # runs until `stop` is set or settings.limit frames were read
    source.reconnects, source.outages

A reader thread per connection reads frames and hands them over one at a time; the agent's capture thread takes
them with the latest-frame-wins policy (edge.pipeline), so a slow model never makes the camera's frames pile up.
The watchdog is the iterator itself: when no frame arrives for `stall_timeout_s` (or the reader reports that the
stream ended), it abandons that connection and reopens the source with exponential backoff (0.5 s doubling up to
`reconnect_max_s`, with jitter), for as long as it takes: only `stop` (Ctrl-C) or the frame limit ends a live run.
One line is logged when the source goes down and one when it is back, none per attempt.

At start-up a source that does not open is an error (a wrong URL or a missing camera is a setting to fix); once
it has delivered, a camera that vanishes (unplugged, driver reset) is retried exactly as a stream is.
"""
from __future__ import annotations

import os
import queue
import random
import threading
import time
from typing import Callable, Iterator

# FFmpeg's own log lines ("[tcp @ 0x...] Connection refused") would repeat on every reconnect attempt; the
# watchdog's lines say what happened. Read when OpenCV's FFmpeg backend first opens something.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")

import cv2  # noqa: E402

from .config import SourceSettings, redact_url  # noqa: E402
from .frames import Frame, Source, SourceError, bgr_to_rgb, fit_image  # noqa: E402

RECONNECT_INITIAL_S = 0.5  # first backoff step after an outage
_ENDED = object()  # a reader's last item: its connection stopped delivering


class Backoff:
    """Exponential backoff with jitter: `initial_s` doubling up to `max_s`; each delay is drawn uniformly from
    the upper half of the current step ("equal jitter"), so agents that lost the same camera do not retry in step."""

    def __init__(self, initial_s: float, max_s: float, rng: random.Random | None = None):
        self.initial_s, self.max_s = initial_s, max(max_s, initial_s)
        self._rng = rng or random.Random()
        self._step = initial_s

    def reset(self) -> None:
        self._step = self.initial_s

    def next(self) -> float:
        step = self._step
        self._step = min(self._step * 2, self.max_s)
        return step / 2 + self._rng.uniform(0, step / 2)


class _Reader:
    """Reads one open capture on its own thread until the capture fails or the reader is abandoned; frames go
    into `frames` one at a time. An abandoned reader stuck in a read releases its capture when the read returns
    (the FFmpeg backend bounds reads with its read timeout), never blocking the watchdog meanwhile."""

    def __init__(self, cap, size: int, name: str):
        self.cap, self.size = cap, size
        self.frames: queue.Queue = queue.Queue(maxsize=1)
        self.failure: str | None = None
        self.abandoned = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.abandoned.is_set():
                ok, bgr = self.cap.read()
                if self.abandoned.is_set():
                    return
                if not ok or bgr is None:
                    self.failure = "the source stopped delivering frames (closed, unplugged or timed out)"
                    break
                t0 = time.perf_counter()
                pixels = _fit(bgr, self.size)
                frame = Frame(-1, pixels, t0, fit_ms=(time.perf_counter() - t0) * 1e3)
                if not self._put(frame):
                    return
        except Exception as err:  # noqa: BLE001 - any backend error is an outage, which the watchdog handles
            self.failure = f"reading failed ({err.__class__.__name__}: {err})"
        finally:
            self.cap.release()
        self._put(_ENDED)

    def _put(self, item) -> bool:
        while not self.abandoned.is_set():
            try:
                self.frames.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def abandon(self) -> None:
        self.abandoned.set()


def _fit(bgr, size: int):
    return fit_image(bgr_to_rgb(bgr), size)


class LiveSource(Source):
    """A camera or a network stream, read live (the latest frame wins) and reopened whenever it stops."""

    live = True

    def __init__(self, settings: SourceSettings, image_size: int, stop: threading.Event | None = None,
                 log: Callable[[str], None] | None = None, rng: random.Random | None = None):
        if not settings.live:
            raise ValueError(f"LiveSource reads a camera or a stream, not {settings.kind}")
        self.settings, self.size = settings, image_size
        self.target = settings.camera if settings.camera is not None else settings.stream
        self.what = settings.describe()  # for log lines: a stream's password is redacted
        self.stop = stop or threading.Event()  # the run's stop (Ctrl-C): ends the iteration, even mid-outage
        self._closed = threading.Event()
        self.log = log or (lambda msg: None)
        self.backoff = Backoff(RECONNECT_INITIAL_S, settings.reconnect_max_s, rng)
        self.reconnects = 0  # times the source came back after an outage
        self.outages = 0
        self.down_s = 0.0  # total time without frames, over all outages
        self.resumed_at: list[int] = []  # per reconnect: the index of the first frame it delivered
        self._index = 0
        self._reader: _Reader | None = None
        self._connections = 0
        cap = self._open()
        if cap is None:
            raise SourceError(self._open_error())
        self._start_reader(cap)

    # ---- opening ----------------------------------------------------------------------------------------
    def _open(self):
        """An opened cv2.VideoCapture, or None."""
        target = self.target
        if self.settings.stream is not None:
            ms = int(self.settings.open_timeout_s * 1e3)
            read_ms = int(self.settings.stall_timeout_s * 1e3)
            cap = cv2.VideoCapture(target, cv2.CAP_FFMPEG,
                                   [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, read_ms])
        elif isinstance(target, str):
            cap = cv2.VideoCapture(target, cv2.CAP_V4L2)
        else:
            cap = cv2.VideoCapture(int(target))
        if cap.isOpened():
            return cap
        cap.release()
        return None

    def _open_error(self) -> str:
        target = self.target
        if isinstance(target, int):
            return (f"camera {target} could not be opened (no /dev/video{target}, or it is busy or not permitted). "
                    "List cameras with `v4l2-ctl --list-devices`, pass another --camera N or a device path, or use "
                    "--stream URL / --video PATH / --images DIR / --dataset NAME.")
        if self.settings.camera is not None:
            return (f"camera {target} could not be opened (no such device, or it is busy or not permitted): check "
                    "the path (`v4l2-ctl --list-devices`) and that this user may read it (group video)")
        return (f"{self.what} could not be opened within {self.settings.open_timeout_s:g} s: check the URL, that "
                "the camera or server is up and reachable from here, and its user and password; RTSP goes over "
                "TCP (OPENCV_FFMPEG_CAPTURE_OPTIONS='rtsp_transport;udp' for UDP)")

    def _start_reader(self, cap) -> None:
        self._connections += 1
        self._reader = _Reader(cap, self.size, f"edge-live-reader-{self._connections}")

    # ---- the watchdog -----------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Frame]:
        limit = self.settings.limit
        while not self._stopped() and (limit <= 0 or self._index < limit):
            if self._reader is None and not self._reconnect():
                return  # stopped while the source was down
            item = self._next_item()
            if item is None:
                continue  # stopped, or the watchdog declared an outage
            item.index = self._index
            self._index += 1
            yield item

    def _next_item(self) -> Frame | None:
        """The reader's next frame, or None after declaring an outage (nothing for stall_timeout_s, or the reader
        ended) or when `stop` is set."""
        reader = self._reader
        deadline = time.monotonic() + self.settings.stall_timeout_s
        while not self._stopped():
            try:
                item = reader.frames.get(timeout=min(0.1, max(deadline - time.monotonic(), 0.001)))
            except queue.Empty:
                if time.monotonic() >= deadline:
                    self._outage(f"no frame for {self.settings.stall_timeout_s:g} s")
                    return None
                continue
            if item is _ENDED:
                self._outage(reader.failure or "the source stopped delivering frames")
                return None
            return item
        return None

    def _outage(self, reason: str) -> None:
        self.outages += 1
        self._down_since = time.monotonic()
        self._reader.abandon()
        self._reader = None
        self.log(f"{self.what} is down: {reason}; reconnecting with backoff up to "
                 f"{self.settings.reconnect_max_s:g} s, answering the frames in hand meanwhile")

    def _reconnect(self) -> bool:
        """Reopen with backoff until it opens (True) or `stop` is set (False)."""
        self.backoff.reset()
        attempts = 0
        while self._sleep(self.backoff.next()):
            attempts += 1
            cap = self._open()
            if cap is None:
                continue
            self._start_reader(cap)
            self.reconnects += 1
            self.resumed_at.append(self._index)
            down = time.monotonic() - self._down_since
            self.down_s += down
            self.log(f"{self.what} is back after {down:.1f} s ({attempts} attempt{'s' * (attempts != 1)}; "
                     f"reconnect {self.reconnects})")
            return True
        return False

    def _stopped(self) -> bool:
        return self.stop.is_set() or self._closed.is_set()

    def _sleep(self, seconds: float) -> bool:
        """Sleep `seconds` unless stopped first; True if not stopped."""
        end = time.monotonic() + seconds
        while not self._stopped():
            left = end - time.monotonic()
            if left <= 0:
                return True
            self._closed.wait(min(left, 0.1))
        return False

    def close(self) -> None:
        self._closed.set()
        if self._reader is not None:
            self._reader.abandon()
            self._reader = None

    def describe(self) -> str:
        return self.what


__all__ = ["LiveSource", "Backoff", "redact_url"]
