"""Typed configuration of the edge agent, in one place: where frames come from, the exit rule and what the
planner knows about the device and the network, how the agent talks to the cloud, and what it writes.

The edge-agent flags build it (`EdgeConfig.from_args`, each flag's dest is the name of its field); a mapping
builds it too (`EdgeConfig.from_mapping`), and so does a YAML file (`EdgeConfig.from_file`, `edge-agent --config`),
whose values the flags a user gives override. Every value is checked on construction and unknown keys are
refused, so a typo never silently falls back to a default. edge/edge.example.yaml documents every key.

    config = EdgeConfig.from_mapping({
        "source": {"dataset": "cifar10", "limit": 500},
        "decision": {"price": 0.03, "device_gflops": 2.0, "encodings": ["png", "fp16+zstd"]},
        "cloud": {"address": "10.0.0.5:50051", "tls_ca": "ca.pem", "token_file": "token.txt"},
        "output": {"output": "frames.jsonl"},
    })

Sections: `source` (SourceSettings), `decision` (DecisionSettings, what edge.decide builds the planner from),
`agent` (AgentSettings, the agent's threads and requests), `cloud` (CloudSettings, where the cloud is and how to
reach it; edge.link.CloudTarget.from_settings), `output` (OutputSettings); `checkpoint` and `torch_threads` at
the top level.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from rapnet.codec.menu import DEFAULT_ENCODINGS, ENCODING_NAMES
from rapnet.exit_rules import check_rule
from rapnet.shipped import model_for as shipped_model_for

SOURCE_KINDS = ("camera", "stream", "video", "images", "dataset")
STREAM_SCHEMES = ("rtsp", "rtsps", "http", "https")  # what OpenCV's FFmpeg backend reads as a live stream
# Fields whose None means auto: a mapping may say "auto" too.
AUTO_FIELDS = ("device_gflops", "encodings", "runtime", "max_message_bytes")
MAX_CONFIG_BYTES = 1 << 20  # a configuration file larger than this is not one


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the value, its flag and what to give instead."""


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _require(ok: bool, key: str, flag: str | None, value, what: str) -> None:
    if not ok:
        named = f"{key} ({flag})" if flag else key
        raise ConfigError(f"{named} = {value!r}: {what}")


def default_checkpoint(dataset: str | None = None) -> str:
    """The shipped RAPNet for a dataset source's images (its own set where one ships), else the camera-resolution
    model (rapnet.shipped.model_for)."""
    return str(shipped_model_for(dataset))


@dataclass(frozen=True)
class SourceSettings:
    """Where frames come from: exactly one of camera, stream, video, images, dataset."""

    camera: int | str | None = None  # OpenCV camera index or device path (/dev/videoN); live: the latest frame wins
    stream: str | None = None  # rtsp://, rtsps://, http:// or https:// (MJPEG) URL, read by FFmpeg; live
    video: str | None = None  # video file, every frame in order
    images: str | None = None  # folder of images (recursive) or a tar archive of them
    dataset: str | None = None  # labelled dataset (rapnet.data): the agent reports accuracy
    split: str = "test"  # the dataset's split
    limit: int = 0  # stop after this many frames; 0: all
    rate: float = 0.0  # pace a file or dataset source at this many frames/s, as a camera would; 0: as fast as read
    # Live sources (camera, stream): the watchdog's settings.
    stall_timeout_s: float = 5.0  # no frame for this long: the source is down, and the watchdog reconnects
    reconnect_max_s: float = 30.0  # reconnect backoff: 0.5 s doubling up to this (with jitter), until it is back
    open_timeout_s: float = 10.0  # a stream that has not opened in this long counts as a failed attempt

    def __post_init__(self) -> None:
        given = [kind for kind in SOURCE_KINDS if getattr(self, kind) is not None]
        if len(given) != 1:
            raise ConfigError(f"source: give exactly one of --camera, --stream, --video, --images, --dataset "
                              f"(got {', '.join(given) if given else 'none'})")
        if isinstance(self.camera, str) and self.camera.strip().isdigit():  # "0" in a file means index 0
            object.__setattr__(self, "camera", int(self.camera))
        if isinstance(self.camera, str):
            _require("://" not in self.camera and bool(self.camera.strip()), "source.camera", "--camera", self.camera,
                     "give a camera index (0) or a device path (/dev/video0); a network camera is a --stream URL")
        else:
            _require(self.camera is None or self.camera >= 0, "source.camera", "--camera", self.camera,
                     "a camera index is >= 0")
        if self.stream is not None:
            scheme = self.stream.split("://", 1)[0].lower() if "://" in self.stream else ""
            _require(scheme in STREAM_SCHEMES, "source.stream", "--stream", redact_url(self.stream),
                     f"give a URL starting {', '.join(s + '://' for s in STREAM_SCHEMES)}; a file is --video PATH")
        for name, flag in (("stall_timeout_s", "--stall-timeout-s"), ("reconnect_max_s", "--reconnect-max-s"),
                           ("open_timeout_s", None)):
            value = getattr(self, name)
            _require(_finite(value) and value > 0, f"source.{name}", flag, value, "give a finite number of seconds > 0")
        _require(self.limit >= 0, "source.limit", "--limit", self.limit, "give a number of frames >= 0 (0: all)")
        _require(_finite(self.rate) and self.rate >= 0, "source.rate", "--rate", self.rate,
                 "give frames/s >= 0 (0: as fast as the source reads)")

    @property
    def kind(self) -> str:
        return next(kind for kind in SOURCE_KINDS if getattr(self, kind) is not None)

    @property
    def live(self) -> bool:
        """A camera or a stream: the latest frame wins, and the watchdog reconnects."""
        return self.kind in ("camera", "stream")

    def describe(self) -> str:
        if self.dataset is not None:
            return f"dataset {self.dataset} ({self.split})"
        if self.stream is not None:
            return f"stream {redact_url(self.stream)}"
        return f"{self.kind} {getattr(self, self.kind)}"


def redact_url(url: str) -> str:
    """`url` without the password it may carry (rtsp://user:secret@host -> rtsp://user:***@host): for logs."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    authority, slash, path = rest.partition("/")
    if "@" not in authority:
        return url
    userinfo, _, host = authority.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}{slash}{path}"


@dataclass(frozen=True)
class DecisionSettings:
    """The exit rule, and what the planner knows about the device, the cloud and the network (the network part is
    a prior until the agent measures its transfers)."""

    # The priced rule (the default): the exit maximising predictor score - price x relative cost. None: the
    # checkpoint metadata's "price", else orchestration.planner.DEFAULT_PRICE. Rules: rapnet.exit_rules.
    price: float | None = None
    threshold: float | None = None  # given: the threshold rule at it instead (not with price)
    # Given: the capped rule: the priced rule's exit is the deepest the frame may run, and the first exit on the way
    # whose top softmax probability reaches it answers (edge and cloud both check).
    stop_confidence: float | None = None
    device_gflops: float | None = None  # the device's speed; None: auto, measured at start-up
    device_layer_us: float | None = None  # cost of one layer call on the device; None: the reference CPU's, scaled
    cloud_gflops: float = 100.0  # the cloud's speed as the planner models it
    latency_budget_ms: float | None = None  # per-frame budget the planner keeps; None: none
    encodings: tuple[str, ...] | None = None  # the menu the planner picks from; None: auto (the default menu)
    bandwidth_mbps: float = 50.0  # uplink prior (or the fixed uplink, with fixed_network)
    rtt_ms: float = 5.0  # round-trip prior (or the fixed one)
    cloud_queue_ms: float = 0.0  # cloud queueing prior
    # Fixed cost per cloud request (gRPC, front, Ray hop, batching), with fixed_network only: a live estimate
    # already holds it (its RTT is the round trip minus the server's own time).
    cloud_overhead_ms: float = 0.0
    cloud_exit: bool = True  # when the image goes to the cloud anyway, skip the predictor here (the cloud picks)
    fixed_network: bool = False  # plan with the priors only, ignoring the live estimate (reproducible runs)
    calibration_frames: int = 16  # first frames on which real request sizes are measured for the planner
    traces: str | None = None  # a rapnet-sim trace cache of the checkpoint to take request sizes from instead

    def __post_init__(self) -> None:
        try:
            check_rule(self.price, self.threshold, self.stop_confidence,
                       names=("decision.price (--price)", "decision.threshold (--threshold)",
                              "decision.stop_confidence (--stop-confidence)"))
        except ValueError as err:
            raise ConfigError(str(err)) from None
        _require(self.device_gflops is None or (_finite(self.device_gflops) and self.device_gflops > 0),
                 "decision.device_gflops", "--device-gflops", self.device_gflops,
                 "the device's speed is a finite number of GFLOP/s > 0, or auto")
        _require(self.device_layer_us is None or (_finite(self.device_layer_us) and self.device_layer_us >= 0),
                 "decision.device_layer_us", "--device-layer-us", self.device_layer_us,
                 "a per-layer cost is a finite number of microseconds >= 0")
        _require(_finite(self.cloud_gflops) and self.cloud_gflops > 0, "decision.cloud_gflops", "--cloud-gflops",
                 self.cloud_gflops, "the cloud's speed is a finite number of GFLOP/s > 0")
        _require(self.latency_budget_ms is None or (_finite(self.latency_budget_ms) and self.latency_budget_ms > 0),
                 "decision.latency_budget_ms", "--latency-budget-ms", self.latency_budget_ms,
                 "a latency budget is a finite number of ms > 0")
        _require(_finite(self.bandwidth_mbps) and self.bandwidth_mbps > 0, "decision.bandwidth_mbps",
                 "--bandwidth-mbps", self.bandwidth_mbps, "the uplink is a finite number of Mbit/s > 0")
        for name, flag in (("rtt_ms", "--rtt-ms"), ("cloud_queue_ms", None),
                           ("cloud_overhead_ms", "--cloud-overhead-ms")):
            value = getattr(self, name)
            _require(_finite(value) and value >= 0, f"decision.{name}", flag, value, "give a finite number of ms >= 0")
        _require(self.calibration_frames >= 1, "decision.calibration_frames", "--calibration-frames",
                 self.calibration_frames, "the planner needs at least one calibration frame")
        if self.encodings is not None:
            chosen = tuple(dict.fromkeys(self.encodings))
            unknown = [e for e in chosen if e not in ENCODING_NAMES]
            _require(bool(chosen) and not unknown, "decision.encodings", "--encoding", ",".join(self.encodings),
                     f"choose auto or a menu from {', '.join(ENCODING_NAMES)}")
            object.__setattr__(self, "encodings", chosen)

    @property
    def menu(self) -> tuple[str, ...]:
        """The encodings the planner may pick from (auto: rapnet.codec.menu.DEFAULT_ENCODINGS)."""
        return self.encodings if self.encodings is not None else DEFAULT_ENCODINGS


@dataclass(frozen=True)
class AgentSettings:
    """How the agent's threads work: the per-request deadline, the requests in flight, the frame queue."""

    deadline_ms: float = 1000.0  # per cloud request; past it the edge answers the frame itself
    in_flight: int = 4  # cloud requests queued or on the wire at once (one network thread each)
    frame_queue: int = 4  # captured frames waiting for the compute thread (live sources: 1, the latest wins)
    emulate_device: bool = False  # pad predictor, local compute and encoding to the planner's modelled device time
    use_predictor: bool = True  # False: baselines that do not run the exit predictor (scores = None)

    def __post_init__(self) -> None:
        _require(_finite(self.deadline_ms) and self.deadline_ms > 0, "agent.deadline_ms", "--deadline-ms",
                 self.deadline_ms, "a deadline is a finite number of ms > 0")
        _require(self.in_flight >= 1, "agent.in_flight", "--in-flight", self.in_flight,
                 "at least one request must be allowed in flight")
        _require(self.frame_queue >= 1, "agent.frame_queue", None, self.frame_queue, "the frame queue holds >= 1")


@dataclass(frozen=True)
class CloudSettings:
    """Where the cloud front is and how to reach it. No address: the agent starts the cloud tier itself on
    127.0.0.1 (edge.embedded_cloud), which makes its own token and runs plaintext on loopback."""

    address: str | None = None  # HOST:PORT of the cloud front; None: the embedded local cloud
    tls_ca: str | None = None  # CA certificate that signed the cloud's certificate; None: plaintext
    tls_cert: str | None = None  # client certificate (mutual TLS)
    tls_key: str | None = None  # client key (mutual TLS)
    token_file: str | None = None  # bearer token file; None: $RAPNET_TOKEN. The token itself is never printed.
    breaker_failures: int = 3  # consecutive failures that open the circuit (frames are then answered here)
    breaker_cooldown_s: float = 2.0  # open time before a half-open probe
    # gRPC send and receive limit, bytes. None: auto, from the model contract (rapnet.codec.budget.link_message_limit:
    # the largest request the checkpoint's carry and the encoding menu can make, the cloud front's receive limit
    # for the model); the planner sends no request over it.
    max_message_bytes: int | None = None
    # The start-up check (edge.startup): health and one authenticated call before the first frame. After a failure
    # that blocks offloading, checked again in the background with a backoff from 1 s doubling up to this (jitter).
    startup_check: bool = True
    check_retry_max_s: float = 30.0

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("cloud: --tls-cert and --tls-key go together (mutual TLS); give both or neither")
        if self.tls_cert is not None and self.tls_ca is None:
            raise ConfigError("cloud: mutual TLS needs --tls-ca as well (the CA that signed the cloud's certificate)")
        remote_only = [flag for flag, value in (("--tls-ca", self.tls_ca), ("--tls-cert", self.tls_cert),
                                                ("--token-file", self.token_file)) if value is not None]
        if self.address is None and remote_only:
            raise ConfigError(f"cloud: {', '.join(remote_only)} describe a remote cloud: give its address with "
                              f"--cloud HOST:PORT (the embedded local cloud makes its own token and runs plaintext)")
        _require(self.breaker_failures >= 1, "cloud.breaker_failures", "--breaker-failures", self.breaker_failures,
                 "the circuit opens after >= 1 failures")
        _require(_finite(self.breaker_cooldown_s) and self.breaker_cooldown_s > 0, "cloud.breaker_cooldown_s",
                 "--breaker-cooldown-s", self.breaker_cooldown_s, "a cooldown is a finite number of seconds > 0")
        _require(self.max_message_bytes is None or self.max_message_bytes >= 1024, "cloud.max_message_bytes",
                 "--max-message-bytes", self.max_message_bytes,
                 "give at least 1024 bytes, or auto (from the model contract)")
        _require(_finite(self.check_retry_max_s) and self.check_retry_max_s >= 1, "cloud.check_retry_max_s", None,
                 self.check_retry_max_s, "give a finite number of seconds >= 1")

    @property
    def embedded(self) -> bool:
        return self.address is None

    def message_limit(self, contract, encodings=None) -> int:
        """The gRPC send and receive limit: max_message_bytes where given, else the one `contract` (the loaded
        model's rapnet.codec.ModelContract) and the encoding menu `encodings` set
        (rapnet.codec.budget.link_message_limit)."""
        if self.max_message_bytes is not None:
            return self.max_message_bytes
        from rapnet.codec.budget import link_message_limit

        return link_message_limit(contract, encodings)


@dataclass(frozen=True)
class OutputSettings:
    """What the agent writes besides the summary it always prints to stderr."""

    output: str | None = None  # JSON lines, one per frame; "-": stdout; None: none
    summary_json: str | None = None  # also write the summary as JSON here
    display: bool = False  # draw the label in an OpenCV window (needs a screen)
    quiet: bool = False  # no live status line
    metrics_port: int | None = None  # serve Prometheus metrics on this port (0: a free one); None: no endpoint
    metrics_host: str = "127.0.0.1"  # the metrics endpoint's address (loopback: only this machine scrapes it)

    def __post_init__(self) -> None:
        _require(self.metrics_port is None or 0 <= self.metrics_port <= 65535, "output.metrics_port",
                 "--metrics-port", self.metrics_port, "give a TCP port 0..65535 (0: a free one)")
        _require(bool(self.metrics_host.strip()), "output.metrics_host", "--metrics-host", self.metrics_host,
                 "give an address to bind, e.g. 127.0.0.1")


@dataclass(frozen=True)
class EdgeConfig:
    """Everything one edge-agent run is configured with."""

    source: SourceSettings
    checkpoint: str | None = None  # RAPNet checkpoint (edge and embedded cloud); None: default_checkpoint(dataset)
    torch_threads: int = 1  # intra-op threads of the agent's runtime (ONNX Runtime or PyTorch)
    runtime: str | None = None  # "onnx" or "torch"; None: onnx where onnxruntime is installed (edge.runtime)
    decision: DecisionSettings = field(default_factory=DecisionSettings)
    agent: AgentSettings = field(default_factory=AgentSettings)
    cloud: CloudSettings = field(default_factory=CloudSettings)
    output: OutputSettings = field(default_factory=OutputSettings)

    def __post_init__(self) -> None:
        if self.checkpoint is None:
            object.__setattr__(self, "checkpoint", default_checkpoint(self.source.dataset))
        _require(self.torch_threads >= 1, "torch_threads", "--torch-threads", self.torch_threads,
                 "give at least one thread")
        _require(self.runtime in (None, "onnx", "torch"), "runtime", "--runtime", self.runtime,
                 "choose onnx or torch (or leave it out: onnx where onnxruntime is installed)")
        if self.agent.emulate_device and self.decision.device_gflops is None:
            raise ConfigError("--emulate-device pads this CPU's compute to a slower device's: give that device's "
                              "speed with --device-gflops G")

    # ---- building ------------------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> "EdgeConfig":
        """From nested mappings (sections as sub-mappings). Unknown keys and values of the wrong type are refused."""
        if data is not None and not isinstance(data, Mapping):
            raise ConfigError(f"the edge configuration must be a mapping, got {type(data).__name__}")
        return _build(cls, dict(data or {}), "")

    @classmethod
    def from_args(cls, args) -> "EdgeConfig":
        """From parsed edge-agent flags: every flag's dest is the name of a field of one section (or of the top
        level); a flag left at its default gives the field's default."""
        return cls.from_mapping(with_flags({}, vars(args)))

    @classmethod
    def from_file(cls, path: str | os.PathLike, flags: Mapping[str, Any] | None = None) -> "EdgeConfig":
        """From a YAML file (sections as in from_mapping), with `flags` (flag dest -> value, only those the user
        gave) overriding its values. Errors name the file."""
        data = load_config_file(path)
        try:
            return cls.from_mapping(with_flags(data, flags or {}))
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_mapping(self) -> dict:
        """Plain nested dicts and lists (tuples as lists): what from_mapping reads back, and what a YAML file
        holds (`edge-agent --print-config`)."""
        def plain(value):
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [plain(v) for v in value]
            return value
        return plain(self.to_dict())


def with_flags(data: Mapping[str, Any], flags: Mapping[str, Any]) -> dict:
    """`data` (nested sections) with `flags` (flat: flag dest -> value) written into the sections their fields
    belong to. A source flag replaces the source `data` names (--video in place of a file's dataset); names that
    are no field (e.g. config) are left out."""
    merged = {key: dict(value) if isinstance(value, Mapping) else value for key, value in data.items()}
    sections = _sections(EdgeConfig)
    for name in (f.name for f in dataclasses.fields(EdgeConfig)):
        if name not in sections and name in flags:
            merged[name] = flags[name]
    for name, section in sections.items():
        values = {f.name: flags[f.name] for f in dataclasses.fields(section) if f.name in flags}
        if not values:
            continue
        target = merged.get(name)
        target = dict(target) if isinstance(target, Mapping) else {}
        if section is SourceSettings and any(values.get(kind) is not None for kind in SOURCE_KINDS):
            for kind in SOURCE_KINDS:
                target.pop(kind, None)
        target.update(values)
        merged[name] = target
    return merged


def load_config_file(path: str | os.PathLike) -> dict:
    """The mapping a YAML configuration file holds (yaml.safe_load), checked to be one; ConfigError naming the
    file (and the line, for a syntax error) otherwise."""
    import yaml  # only a run with --config needs it

    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {size} bytes, more than a configuration file holds (at most "
                              f"{MAX_CONFIG_BYTES}): is it the right file?")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file (edge/edge.example.yaml is a documented example)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--config {path}: cannot read it ({err})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{path}{where}: not valid YAML ({problem}): fix the syntax there") from None
    if data is None:
        raise ConfigError(f"{path} is empty: give at least a source section, e.g. `source: {{camera: 0}}`")
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: the file must hold a mapping of sections (source:, decision:, ...), "
                          f"got {type(data).__name__}")
    return dict(data)


def _sections(cls) -> dict[str, type]:
    """The settings sections of `cls`: field name -> settings class."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}


def _describe(hint) -> str:
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _convert(value, hint):
    """`value` as `hint` (an int where a float goes, a list where a tuple goes); raises TypeError if it is not one."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        for option in typing.get_args(hint):
            try:
                return _convert(value, option)
            except TypeError:
                pass
        raise TypeError
    if hint is type(None):
        if value is None:
            return None
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif typing.get_origin(hint) is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(_convert(v, typing.get_args(hint)[0]) for v in value)
    raise TypeError


def _build(cls, data: dict, where: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        near = [m for key in unknown for m in difflib.get_close_matches(str(key), list(fields), n=1)]
        raise ConfigError(f"unknown keys {unknown} in {where.rstrip('.') or 'the top level'}; known: {sorted(fields)}"
                          + (f" (did you mean {', '.join(repr(m) for m in near)}?)" if near else ""))
    values = {}
    for name, value in data.items():
        hint = hints[name]
        if name in AUTO_FIELDS and value == "auto":
            value = None
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}{name} must be a mapping of its settings, got {value!r}")
            values[name] = _build(hint, dict(value), f"{where}{name}.")
            continue
        try:
            values[name] = _convert(value, hint)
        except TypeError:
            raise ConfigError(f"{where}{name} must be {_describe(hint)}, got {value!r}") from None
    missing = [name for name, f in fields.items() if name not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}{missing[0]} is required" + (
            f" (a mapping with exactly one of {', '.join(SOURCE_KINDS)})" if missing == ["source"] else ""))
    return cls(**values)
