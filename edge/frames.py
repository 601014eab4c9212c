"""Frame sources for the edge agent: camera and network stream (edge.streams), video file, image folder/archive,
labelled dataset.

Every source yields `Frame`s holding uint8 RGB pixels already fitted to the model's input size with
`rapnet.data.fit_image`, the same resize-shorter-side + centre-crop that the dataset loaders apply.

    source = open_source(SourceSettings(video="clip.avi"), image_size=32)   # edge.config.SourceSettings
    for frame in source: ...
    source.close()

`live` sources (a camera, a stream) are read by the agent with a latest-frame-wins policy and reconnect when they
stop (edge.streams.LiveSource); the others never lose a frame.
"""
from __future__ import annotations

import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from rapnet.data import IMAGE_EXTS, fit_image, is_image_name

from .config import SourceSettings

ARCHIVE_EXTS = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")

cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # our errors say what failed; no V4L2 noise


class SourceError(Exception):
    """A source that cannot be opened or read; the message says what was wrong and what to do."""


def bgr_to_rgb(bgr: np.ndarray) -> np.ndarray:
    """OpenCV's BGR (or grey, or BGRA) frame -> uint8 RGB."""
    if bgr.ndim == 2:
        return cv2.cvtColor(bgr, cv2.COLOR_GRAY2RGB)
    if bgr.shape[2] == 4:
        return cv2.cvtColor(bgr, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


@dataclass
class Frame:
    index: int  # position in the source (capture order; a live source may skip some)
    pixels: np.ndarray  # uint8 (S, S, 3) RGB, fitted to the model input
    captured: float  # time.perf_counter() at capture
    label: int | None = None
    name: str | None = None  # file name for image sources
    fit_ms: float = 0.0  # colour conversion + resize/crop time at capture


class Source:
    live = False  # latest frame wins when the agent falls behind
    classes: list[str] | None = None  # class names when frames are labelled

    def __iter__(self) -> Iterator[Frame]:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        pass


def _convert(index: int, bgr: np.ndarray, size: int, label=None, name=None, t0: float | None = None) -> Frame:
    t0 = time.perf_counter() if t0 is None else t0
    pixels = fit_image(bgr_to_rgb(bgr), size)
    t1 = time.perf_counter()
    return Frame(index, pixels, t0, label, name, (t1 - t0) * 1e3)


class CaptureSource(Source):
    """OpenCV VideoCapture of a video file (every frame, in order), or a camera index read without a watchdog
    (the agent reads cameras through edge.streams.LiveSource)."""

    def __init__(self, target: int | str, size: int, limit: int = 0, live: bool | None = None):
        self.target, self.size, self.limit = target, size, limit
        self.live = isinstance(target, int) if live is None else live
        if isinstance(target, str) and not Path(target).is_file():
            raise SourceError(f"video file {target} does not exist: check the path")
        self._cap = cv2.VideoCapture(target)
        if not self._cap.isOpened():
            self._cap.release()
            if isinstance(target, int):
                raise SourceError(
                    f"camera {target} could not be opened (no /dev/video{target}, or it is busy or not permitted). "
                    "List cameras with `v4l2-ctl --list-devices`, pass another --camera N, or use --video PATH / "
                    "--images DIR / --dataset NAME.")
            raise SourceError(f"OpenCV cannot read video {target} (unknown container or codec): re-encode it, "
                              "e.g. `ffmpeg -i IN -c:v mjpeg OUT.avi`")

    def __iter__(self) -> Iterator[Frame]:
        index = 0
        while self.limit <= 0 or index < self.limit:
            t0 = time.perf_counter()
            ok, bgr = self._cap.read()
            if not ok or bgr is None:
                if index == 0 and not self.live:
                    raise SourceError(f"video {self.target} has no readable frame")
                return
            yield _convert(index, bgr, self.size, t0=t0)
            index += 1

    def close(self) -> None:
        self._cap.release()


def _decode(data: bytes, what: str) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise SourceError(f"cannot decode image {what}: not a valid image file; delete or replace it")
    return img


class ImageFilesSource(Source):
    """Every image under a folder (recursive, sorted by path) or inside a tar archive (member order)."""

    def __init__(self, path: str, size: int, limit: int = 0):
        self.path, self.size, self.limit = Path(path), size, limit
        if not self.path.exists():
            raise SourceError(f"--images {path} does not exist: pass a folder of images or a tar archive of them")
        if self.path.is_file() and not str(self.path).lower().endswith(ARCHIVE_EXTS):
            raise SourceError(f"--images {path} is a file but not a tar archive ({', '.join(ARCHIVE_EXTS)})")
        if self.path.is_dir():
            self._files = sorted(p for p in self.path.rglob("*") if p.is_file() and is_image_name(p.name))
            if not self._files:
                raise SourceError(f"no images ({'/'.join(IMAGE_EXTS)}) under {path}")
        else:
            try:
                with tarfile.open(self.path) as tar:
                    self._members = [m.name for m in tar.getmembers() if m.isfile() and is_image_name(m.name)]
            except (tarfile.TarError, OSError) as err:
                raise SourceError(f"cannot read archive {path}: {err}") from None
            if not self._members:
                raise SourceError(f"archive {path} holds no images ({'/'.join(IMAGE_EXTS)})")

    def __iter__(self) -> Iterator[Frame]:
        if self.path.is_dir():
            items = ((str(p), p.read_bytes) for p in self._files)
            yield from self._frames(items)
            return
        with tarfile.open(self.path) as tar:
            def reader(name):
                return lambda: tar.extractfile(name).read()
            yield from self._frames((name, reader(name)) for name in self._members)

    def _frames(self, items) -> Iterator[Frame]:
        for index, (name, read) in enumerate(items):
            if self.limit > 0 and index >= self.limit:
                return
            t0 = time.perf_counter()
            yield _convert(index, _decode(read(), name), self.size, name=name, t0=t0)


class DatasetSource(Source):
    """A labelled split loaded through rapnet.data (any layout it knows; decoded once into its cache)."""

    def __init__(self, name_or_path: str, size: int, split: str = "test", limit: int = 0):
        from rapnet.data import DatasetError, load_dataset, locate_dataset, stratified_sample

        try:
            path = Path(name_or_path).expanduser()
            located = path if path.exists() else locate_dataset(None, name_or_path)
            data = load_dataset(located, split, image_size=size)  # decoded at the model's size (fit_image)
        except DatasetError as err:
            raise SourceError(str(err)) from None
        if limit > 0:  # a seeded sample spread over the classes: splits are often stored class by class
            data = data.subset(stratified_sample(data.labels, limit))
        self.images, self.labels = data.images, data.labels
        self.classes = list(data.classes)
        self.where, self.size = str(data.source), size

    def __iter__(self) -> Iterator[Frame]:
        for index in range(len(self.labels)):
            t0 = time.perf_counter()
            pixels = fit_image(self.images[index], self.size)  # already RGB
            yield Frame(index, pixels, t0, int(self.labels[index]), None, (time.perf_counter() - t0) * 1e3)


def open_source(spec: SourceSettings, image_size: int, stop=None, log=None) -> Source:
    """The one source `spec` names (SourceSettings holds exactly one of camera, stream, video, images, dataset).
    A live one (camera, stream) reads until `stop` (a threading.Event) is set and reports outages to `log`."""
    if spec.live:
        from .streams import LiveSource

        return LiveSource(spec, image_size, stop=stop, log=log)
    if spec.video is not None:
        return CaptureSource(str(spec.video), image_size, spec.limit, live=False)
    if spec.images is not None:
        return ImageFilesSource(spec.images, image_size, spec.limit)
    return DatasetSource(spec.dataset, image_size, spec.split, spec.limit)


__all__ = ["Frame", "Source", "SourceError", "CaptureSource", "ImageFilesSource", "DatasetSource",
           "open_source", "fit_image", "bgr_to_rgb"]
