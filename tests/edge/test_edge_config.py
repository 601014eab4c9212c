"""The edge agent's typed configuration (edge.config) and its flags: defaults in one place, values checked on
construction, unknown keys refused, every flag mapped to a field, and a help text that shows the true defaults.
Nothing here loads a model or starts Ray."""
from __future__ import annotations

import argparse
import dataclasses
import re

import pytest

from edge import agent as edge_agent
from edge.config import (AgentSettings, CloudSettings, ConfigError, DecisionSettings, EdgeConfig, OutputSettings,
                         SourceSettings, default_checkpoint)
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
    assert c.checkpoint == default_checkpoint() == str(shipped_checkpoint("rapnet", "cifar10"))
    assert c.decision.device_gflops is None and c.decision.encodings is None  # auto
    assert c.decision.menu == DEFAULT_ENCODINGS and c.decision.cloud_exit and c.cloud.embedded


def test_every_flag_sets_one_field():
    """Each flag's dest names a field of one section or of the top level, so EdgeConfig.from_args drops none."""
    fields = {f.name for f in dataclasses.fields(EdgeConfig)} - set(SECTIONS)
    for cls in SECTIONS.values():
        names = {f.name for f in dataclasses.fields(cls)}
        assert not names & fields, f"{cls.__name__} shares a field name with another section"
        fields |= names
    dests = {a.dest for a in edge_agent.build_parser()._actions if a.dest != "help"}
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
               "s.json", "--display", "--quiet")
    assert c.source == SourceSettings(dataset="cifar10", split="train", limit=7, rate=12.5)
    assert (c.checkpoint, c.torch_threads) == ("m.pt", 2)
    assert c.decision == DecisionSettings(
        price=0.1, stop_confidence=0.8, device_gflops=2.5, device_layer_us=3.0, cloud_gflops=50.0,
        latency_budget_ms=40.0, encodings=("png", "fp16+zstd"), bandwidth_mbps=10.0, rtt_ms=20.0,
        cloud_overhead_ms=6.0, cloud_exit=False, fixed_network=True, calibration_frames=4, traces="t.npz")
    assert c.agent == AgentSettings(deadline_ms=300.0, in_flight=2, emulate_device=True)
    assert c.cloud == CloudSettings("h:1", "ca.pem", "c.pem", "k.pem", "tok", 5, 1.5, 4096)
    assert c.output == OutputSettings("-", "s.json", display=True, quiet=True)
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
    with pytest.raises(ConfigError, match="exactly one of --camera, --video, --images, --dataset"):
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
    sources = {"--camera", "--video", "--images", "--dataset"}  # exactly one is required: no default
    for action in parser._actions:
        option = action.option_strings[0]
        if option == "-h" or option in sources:
            continue
        assert action.help, f"{option} has no help"
        if action.nargs != 0:  # on/off flags say in words which way is the default, where it is not plain off
            assert "default:" in entries[option], f"{option} does not show its default: {entries[option]}"
    assert "(default: auto)" in entries["--device-gflops"] and "(default: auto)" in entries["--encoding"]
    assert "the shipped CIFAR-10 model" in entries["--checkpoint"] and default_checkpoint() in text.replace("\n", "")
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
