"""The edge agent's typed configuration (edge.config), its flags and its YAML file: defaults in one place, values
checked on construction, unknown keys refused, every flag mapped to a field, a file equal to the flags it replaces
and overridden by the flags given, and a help text that shows the true defaults. Nothing here loads a model or
starts Ray."""
from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from edge import agent as edge_agent
from edge.config import (AgentSettings, CloudSettings, ConfigError, DecisionSettings, EdgeConfig, OutputSettings,
                         SourceSettings, default_checkpoint, redact_url)
from rapnet.codec.menu import DEFAULT_ENCODINGS
from rapnet.shipped import default_checkpoint as shipped_checkpoint

SECTIONS = {"source": SourceSettings, "decision": DecisionSettings, "agent": AgentSettings, "cloud": CloudSettings,
            "output": OutputSettings}


def config(*flags: str) -> EdgeConfig:
    return edge_agent.parse_config(["--dataset", "cifar10", *flags])


def test_defaults_of_the_flags_are_the_configs():
    """A run without flags and a mapping without keys configure the same agent: the defaults live in edge.config
    only, and the parser reads them from there."""
    assert config() == EdgeConfig.from_mapping({"source": {"dataset": "cifar10"}})
    c = config()
    assert c.checkpoint == default_checkpoint("cifar10") == str(shipped_checkpoint("rapnet", "cifar10"))
    assert c.decision.device_gflops is None and c.decision.encodings is None  # auto
    assert c.decision.menu == DEFAULT_ENCODINGS and c.decision.cloud_exit and c.cloud.embedded


def test_every_flag_sets_one_field():
    """Each flag's dest names a field of one section or of the top level, so EdgeConfig.from_args drops none."""
    fields = {f.name for f in dataclasses.fields(EdgeConfig)} - set(SECTIONS)
    for cls in SECTIONS.values():
        names = {f.name for f in dataclasses.fields(cls)}
        assert not names & fields, f"{cls.__name__} shares a field name with another section"
        fields |= names
    dests = {a.dest for a in edge_agent.build_parser()._actions if a.dest != "help"} - set(edge_agent.META_FLAGS)
    assert dests <= fields, f"flags without a field: {sorted(dests - fields)}"


def test_flags_map_to_their_fields():
    c = config("--split", "train", "--limit", "7", "--rate", "12.5", "--checkpoint", "m.pt", "--torch-threads", "2",
               "--price", "0.1", "--stop-confidence", "0.8", "--device-gflops", "2.5", "--device-layer-us", "3",
               "--cloud-gflops", "50", "--latency-budget-ms", "40", "--encoding", "png, fp16+zstd,png",
               "--bandwidth-mbps", "10", "--rtt-ms", "20", "--fixed-network", "--cloud-overhead-ms", "6",
               "--no-cloud-exit", "--calibration-frames", "4", "--traces", "t.npz", "--emulate-device",
               "--cloud", "h:1", "--deadline-ms", "300", "--tls-ca", "ca.pem", "--tls-cert", "c.pem",
               "--tls-key", "k.pem", "--token-file", "tok", "--in-flight", "2", "--breaker-failures", "5",
               "--breaker-cooldown-s", "1.5", "--max-message-bytes", "4096", "--output", "-", "--summary-json",
               "s.json", "--display", "--quiet", "--stall-timeout-s", "2", "--reconnect-max-s", "4",
               "--metrics-port", "9102", "--metrics-host", "0.0.0.0", "--no-cloud-check")
    assert c.source == SourceSettings(dataset="cifar10", split="train", limit=7, rate=12.5, stall_timeout_s=2.0,
                                      reconnect_max_s=4.0)
    assert (c.checkpoint, c.torch_threads) == ("m.pt", 2)
    assert c.decision == DecisionSettings(
        price=0.1, stop_confidence=0.8, device_gflops=2.5, device_layer_us=3.0, cloud_gflops=50.0,
        latency_budget_ms=40.0, encodings=("png", "fp16+zstd"), bandwidth_mbps=10.0, rtt_ms=20.0,
        cloud_overhead_ms=6.0, cloud_exit=False, fixed_network=True, calibration_frames=4, traces="t.npz")
    assert c.agent == AgentSettings(deadline_ms=300.0, in_flight=2, emulate_device=True)
    assert c.cloud == CloudSettings("h:1", "ca.pem", "c.pem", "k.pem", "tok", 5, 1.5, 4096, startup_check=False)
    assert c.output == OutputSettings("-", "s.json", display=True, quiet=True, metrics_port=9102,
                                      metrics_host="0.0.0.0")
    assert config("--threshold", "0.4").decision.threshold == 0.4
    assert EdgeConfig.from_mapping(c.to_dict()) == c


def test_mapping_refuses_unknown_keys_and_wrong_types():
    with pytest.raises(ConfigError, match=r"unknown keys \['decison'\] in the top level; known: .*'decision'"):
        EdgeConfig.from_mapping({"source": {"dataset": "cifar10"}, "decison": {}})
    with pytest.raises(ConfigError, match=r"unknown keys \['prize'\] in decision; known: .*'price'"):
        EdgeConfig.from_mapping({"source": {"dataset": "cifar10"}, "decision": {"prize": 0.1}})
    with pytest.raises(ConfigError, match=r"source.limit must be int, got '5'"):
        EdgeConfig.from_mapping({"source": {"dataset": "cifar10", "limit": "5"}})
    with pytest.raises(ConfigError, match=r"decision.fixed_network must be bool, got 1"):
        EdgeConfig.from_mapping({"source": {"dataset": "cifar10"}, "decision": {"fixed_network": 1}})
    with pytest.raises(ConfigError, match="cloud must be a mapping"):
        EdgeConfig.from_mapping({"source": {"dataset": "cifar10"}, "cloud": "h:1"})
    with pytest.raises(ConfigError, match="source is required"):
        EdgeConfig.from_mapping({})
    # ints where floats go, lists where tuples go
    c = EdgeConfig.from_mapping({"source": {"dataset": "cifar10"}, "decision": {"price": 1, "encodings": ["png"]}})
    assert c.decision.price == 1.0 and isinstance(c.decision.price, float) and c.decision.encodings == ("png",)


@pytest.mark.parametrize("flags, message", [
    (["--price", "-1"], r"--price.* must be a finite number >= 0"),
    (["--stop-confidence", "1.5"], r"--stop-confidence.* must lie in \(0, 1\]"),
    (["--price", "0.1", "--stop-confidence", "0"], r"--stop-confidence.* must lie in \(0, 1\]"),
    (["--threshold", "0.5", "--stop-confidence", "0.9"], r"--stop-confidence.* does not go with .*--threshold"),
    (["--emulate-device"], r"--emulate-device .* --device-gflops G"),
    (["--cloud-overhead-ms", "-1"], r"decision.cloud_overhead_ms \(--cloud-overhead-ms\) = -1.0: give a finite"),
    (["--rtt-ms", "nan"], r"--rtt-ms"),
    (["--bandwidth-mbps", "0"], r"--bandwidth-mbps"),
    (["--latency-budget-ms", "0"], r"--latency-budget-ms"),
    (["--calibration-frames", "0"], r"--calibration-frames"),
    (["--limit", "-1"], r"--limit"),
    (["--rate", "-2"], r"--rate"),
    (["--deadline-ms", "0"], r"agent.deadline_ms \(--deadline-ms\) = 0.0: a deadline is"),
    (["--in-flight", "0"], r"--in-flight"),
    (["--torch-threads", "0"], r"--torch-threads"),
    (["--cloud", "h:1", "--tls-cert", "c.pem", "--tls-ca", "ca.pem"], r"--tls-cert and --tls-key go together"),
    (["--cloud", "h:1", "--tls-cert", "c.pem", "--tls-key", "k.pem"], r"mutual TLS needs --tls-ca"),
    (["--tls-ca", "ca.pem"], r"--tls-ca describe a remote cloud: give its address with --cloud HOST:PORT"),
    (["--token-file", "tok"], r"--token-file describe a remote cloud"),
    (["--cloud", "h:1", "--breaker-failures", "0"], r"--breaker-failures"),
    (["--cloud", "h:1", "--max-message-bytes", "10"], r"--max-message-bytes"),
])
def test_values_that_cannot_work_are_setup_errors_that_name_the_flag(flags, message):
    with pytest.raises(edge_agent.SetupError, match=message):
        config(*flags)


def test_malformed_flags_are_usage_errors(capsys):
    for flags in (["--device-gflops", "fast"], ["--device-gflops", "0"], ["--encoding", "gif"],
                  ["--price", "0.1", "--threshold", "0.5"]):
        with pytest.raises(SystemExit):
            config(*flags)
    assert "choose auto or a comma-separated list" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # no source
        edge_agent.parse_config([])
    assert "give a source: one of --camera, --stream" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="exactly one of --camera, --stream, --video, --images, --dataset"):
        SourceSettings(camera=0, video="v.avi")


def test_settings_are_checked_wherever_they_are_built():
    with pytest.raises(ValueError, match="not both"):
        DecisionSettings(price=0.1, threshold=0.5)
    with pytest.raises(ValueError, match="choose auto or a menu"):
        DecisionSettings(encodings=("png", "gif"))
    with pytest.raises(ValueError, match="--device-gflops"):
        DecisionSettings(device_gflops=0.0)
    assert DecisionSettings(encodings=("png", "png")).encodings == ("png",)


def help_entries(parser: argparse.ArgumentParser) -> dict[str, str]:
    """option string -> its help as printed (one line)."""
    text = parser.format_help()
    entries, current = {}, None
    for line in text.splitlines():
        m = re.match(r"\s{2}(-[-\w]+)", line)
        if m:
            current = m.group(1)
            entries[current] = line
        elif current and line.startswith(" " * 10):
            entries[current] += " " + line.strip()
        else:
            current = None
    return {k: re.sub(r"\s+", " ", v) for k, v in entries.items()}


def test_help_shows_every_options_true_default():
    parser = edge_agent.build_parser()
    text = parser.format_help()
    assert "(default: None)" not in text and "(default: True)" not in text and "(default: False)" not in text
    entries = help_entries(parser)
    sources = set(edge_agent.SOURCE_FLAGS)  # exactly one is required: no default
    for action in parser._actions:
        option = action.option_strings[0]
        if option == "-h" or option in sources:
            continue
        assert action.help, f"{option} has no help"
        if action.nargs != 0:  # on/off flags say in words which way is the default, where it is not plain off
            assert "default:" in entries[option], f"{option} does not show its default: {entries[option]}"
    assert "(default: auto)" in entries["--device-gflops"] and "(default: auto)" in entries["--encoding"]
    assert "the camera-resolution model" in entries["--checkpoint"] and default_checkpoint() in text.replace("\n", "")
    from orchestration.planner import DEFAULT_PRICE

    assert f"else {DEFAULT_PRICE:g}" in entries["--price"]
    assert "default: where sending the image" in entries["--no-cloud-exit"]
    for option in ("--deadline-ms", "--in-flight", "--cloud-gflops", "--bandwidth-mbps", "--calibration-frames"):
        dest = next(a.dest for a in parser._actions if option in a.option_strings)
        section = next(cls for cls in SECTIONS.values() if dest in {f.name for f in dataclasses.fields(cls)})
        assert f"(default: {getattr(section, dest)})" in entries[option]


def test_help_puts_the_users_options_before_the_live_validation_ones():
    parser = edge_agent.build_parser()
    titles = [g.title for g in parser._action_groups if g._group_actions]
    emulation = next(t for t in titles if "rapnet-sim live" in t)
    assert titles.index(emulation) == len(titles) - 1
    group = next(g for g in parser._action_groups if g.title == emulation)
    assert {a.option_strings[0] for a in group._group_actions} == {
        "--rate", "--emulate-device", "--device-layer-us", "--fixed-network", "--cloud-overhead-ms"}


# ------------------------------------------------------------------------------------------------------
# The configuration file (--config): the same EdgeConfig as the flags it replaces, flags override it
# ------------------------------------------------------------------------------------------------------
EXAMPLE = Path(edge_agent.__file__).with_name("edge.example.yaml")

FLAGS = ["--dataset", "cifar10", "--split", "train", "--limit", "7", "--checkpoint", "m.pt", "--torch-threads", "2",
         "--price", "0.1", "--stop-confidence", "0.8", "--device-gflops", "2.5", "--latency-budget-ms", "40",
         "--encoding", "png,fp16+zstd", "--fixed-network", "--no-cloud-exit", "--cloud", "h:1", "--deadline-ms",
         "300", "--tls-ca", "ca.pem", "--token-file", "tok", "--in-flight", "2", "--output", "-", "--quiet",
         "--stall-timeout-s", "2", "--metrics-port", "0"]
FILE = """\
checkpoint: m.pt
torch_threads: 2
source: {dataset: cifar10, split: train, limit: 7, stall_timeout_s: 2}
decision:
  price: 0.1
  stop_confidence: 0.8
  device_gflops: 2.5
  latency_budget_ms: 40
  encodings: [png, fp16+zstd]
  fixed_network: true
  cloud_exit: false
agent: {deadline_ms: 300, in_flight: 2}
cloud: {address: "h:1", tls_ca: ca.pem, token_file: tok}
output: {output: "-", quiet: true, metrics_port: 0}
"""


def write(tmp_path, text: str, name: str = "edge.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_config_file_equals_the_flags_it_replaces(tmp_path):
    path = write(tmp_path, FILE)
    from_flags = edge_agent.parse_config(FLAGS)
    assert EdgeConfig.from_file(path) == from_flags
    assert edge_agent.parse_config(["--config", path]) == from_flags
    assert from_flags.decision.encodings == ("png", "fp16+zstd") and from_flags.output.metrics_port == 0


def test_flags_override_the_file_and_only_the_flags_given(tmp_path):
    path = write(tmp_path, FILE)
    c = edge_agent.parse_config(["--config", path, "--limit", "3", "--deadline-ms", "1000", "--device-gflops", "auto",
                                 "--encoding", "auto"])
    assert c.source.limit == 3 and c.source.dataset == "cifar10" and c.source.split == "train"  # the rest: the file's
    # a flag given at its default value still overrides the file; auto is a value like any other
    assert c.agent.deadline_ms == 1000.0 and c.agent.in_flight == 2
    assert c.decision.device_gflops is None and c.decision.encodings is None and c.decision.price == 0.1
    # a source flag replaces the file's source, whatever kind it was; the file's other source settings stay
    c = edge_agent.parse_config(["--config", path, "--stream", "http://127.0.0.1:8080/video.mjpg"])
    assert c.source.kind == "stream" and c.source.dataset is None and c.source.limit == 7
    assert edge_agent.parse_config(["--config", path, "--camera", "/dev/video2"]).source.camera == "/dev/video2"
    # on/off flags: given, they win; not given, the file's value stands
    assert edge_agent.parse_config(["--config", path]).decision.cloud_exit is False
    assert edge_agent.parse_config(["--config", path, "--display"]).output.display is True
    # the file may leave the source to the command line
    bare = write(tmp_path, "agent: {deadline_ms: 250}\n", "bare.yaml")
    c = edge_agent.parse_config(["--config", bare, "--video", "clip.avi"])
    assert c.source.video == "clip.avi" and c.agent.deadline_ms == 250.0
    with pytest.raises(edge_agent.SetupError, match=r"bare.yaml: source is required"):
        edge_agent.parse_config(["--config", bare])


def test_config_file_errors_name_the_file_the_key_and_the_fix(tmp_path):
    cases = [
        ("source: {dataset: cifar10}\ndecision: {prize: 0.1}\n",
         r"edge.yaml: unknown keys \['prize'\] in decision; known: .* \(did you mean 'price'\?\)"),
        ("source: {dataset: cifar10}\nsoruce: {}\n", r"unknown keys \['soruce'\] in the top level.*did you mean 'source'"),
        ("source: {dataset: cifar10, limit: many}\n", r"edge.yaml: source.limit must be int, got 'many'"),
        ("source: {dataset: cifar10}\nagent: {deadline_ms: -5}\n",
         r"edge.yaml: agent.deadline_ms \(--deadline-ms\) = -5.0: a deadline is a finite number of ms > 0"),
        ("source: {dataset: cifar10}\ncloud: 127.0.0.1:50051\n", r"edge.yaml: cloud must be a mapping of its settings"),
        ("source: {dataset: cifar10\n", r"edge.yaml line 2, column 1: not valid YAML .*: fix the syntax there"),
        ("- source\n", r"edge.yaml: the file must hold a mapping of sections .*got list"),
        ("", r"edge.yaml is empty: give at least a source section"),
        ("source: {dataset: cifar10, camera: 0}\n", r"exactly one of --camera, --stream"),
        ("source: {stream: 'rtsp://admin:hunter2@cam/1', stall_timeout_s: 0}\n", r"source.stall_timeout_s"),
    ]
    for text, message in cases:
        path = write(tmp_path, text)
        with pytest.raises(ConfigError, match=message):
            EdgeConfig.from_file(path)
        with pytest.raises(edge_agent.SetupError, match=message):  # the CLI: a setup error (exit 2)
            edge_agent.parse_config(["--config", path])
    with pytest.raises(ConfigError, match=r"--config .*missing.yaml: no such file"):
        EdgeConfig.from_file(tmp_path / "missing.yaml")
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (1 << 20) + "\n")
    with pytest.raises(ConfigError, match=r"big.yaml: \d+ bytes, more than a configuration file holds"):
        EdgeConfig.from_file(big)


def test_the_example_loads_and_documents_every_key():
    c = EdgeConfig.from_file(EXAMPLE)
    assert c.source.kind == "stream" and c.decision.device_gflops is None and c.decision.encodings is None
    assert EdgeConfig.from_mapping({"source": {"camera": 0}, "runtime": "auto"}).runtime is None
    assert c.output.metrics_port == 9102 and c.output.metrics_host == "127.0.0.1"
    text = EXAMPLE.read_text()
    keys = set(re.findall(r"^\s*#?\s*(\w+):", text, flags=re.M))
    for cls in (EdgeConfig, *SECTIONS.values()):
        for f in dataclasses.fields(cls):
            assert f.name in keys, f"edge.example.yaml does not document {cls.__name__}.{f.name}"


def test_print_config_prints_what_config_reads_back(tmp_path, capsys):
    path = write(tmp_path, FILE)
    assert edge_agent.main(["--config", path, "--limit", "5", "--print-config"]) == 0
    printed = capsys.readouterr().out
    again = write(tmp_path, printed, "printed.yaml")
    expected = edge_agent.parse_config(["--config", path, "--limit", "5"])
    assert EdgeConfig.from_file(again) == expected and "limit: 5" in printed
    assert edge_agent.main(["--dataset", "cifar10", "--print-config"]) == 0
    assert EdgeConfig.from_mapping(yaml.safe_load(capsys.readouterr().out)) == config()


def test_live_sources_take_an_index_a_device_path_or_a_stream_url():
    assert edge_agent.parse_config(["--camera", "2"]).source.camera == 2
    assert edge_agent.parse_config(["--camera", "/dev/video0"]).source.camera == "/dev/video0"
    assert EdgeConfig.from_mapping({"source": {"camera": "1"}}).source.camera == 1  # quoted in a file: still an index
    for url in ("rtsp://cam/1", "rtsps://cam/1", "http://127.0.0.1:8080/video.mjpg", "HTTPS://cam/mjpg"):
        c = edge_agent.parse_config(["--stream", url])
        assert c.source.stream == url and c.source.live
    assert not config().source.live
    with pytest.raises(edge_agent.SetupError, match=r"--stream.*= 'ftp://admin:\*\*\*@cam/x': give a URL starting "
                                                    r"rtsp://"):
        edge_agent.parse_config(["--stream", "ftp://admin:hunter2@cam/x"])
    with pytest.raises(edge_agent.SetupError, match=r"--stream.*a file is --video PATH"):
        edge_agent.parse_config(["--stream", "clip.avi"])
    with pytest.raises(edge_agent.SetupError, match=r"a network camera is a --stream URL"):
        edge_agent.parse_config(["--camera", "rtsp://cam/1"])
    with pytest.raises(edge_agent.SetupError, match=r"--reconnect-max-s"):
        edge_agent.parse_config(["--camera", "0", "--reconnect-max-s", "0"])
    with pytest.raises(edge_agent.SetupError, match=r"--metrics-port"):
        edge_agent.parse_config(["--camera", "0", "--metrics-port", "70000"])
    assert redact_url("rtsp://admin:hunter2@cam:554/s?x=1") == "rtsp://admin:***@cam:554/s?x=1"
    assert redact_url("http://cam/video") == "http://cam/video"
    assert "hunter2" not in SourceSettings(stream="rtsp://admin:hunter2@cam/1").describe()
