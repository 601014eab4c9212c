"""rapnet-cloud's command line: every option has help and shows its true default. Nothing here starts Ray."""
from __future__ import annotations

import argparse
from pathlib import Path

from cloud import cli
from cloud.config import BatchSettings, FrontSettings
from rapnet.shipped import model_for


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_has_help_and_its_true_default():
    commands = subparsers(cli.build_parser())
    assert set(commands) == {"serve", "make-dev-cert", "make-token", "health"}
    for name, parser in commands.items():
        text = " ".join(parser.format_help().split())
        assert "(default: None)" not in text and "(default: [])" not in text and "(default: False)" not in text
        for action in parser._actions:
            if action.option_strings[0] == "-h":
                continue
            assert action.help, f"{name} {action.option_strings[0]} has no help"
            if action.nargs != 0 and not action.required:
                assert "default" in action.help or action.default is not None, \
                    f"{name} {action.option_strings[0]} does not say its default"
    serve = " ".join(commands["serve"].format_help().split())
    assert "the shipped camera-resolution model" in serve
    assert str(model_for()).replace(" ", "") in commands["serve"].format_help().replace("\n", "").replace(" ", "")
    assert f"else {BatchSettings.max_batch_size})" in serve and f"else {FrontSettings.port})" in serve


def test_serve_defaults_to_the_model_the_edge_runs_on_a_camera():
    args = cli.build_parser().parse_args(["serve"])
    assert args.checkpoint == str(model_for()) and args.port is None  # None: the --config value
    assert model_for(None).exists()  # what edge-agent --camera/--stream/--images loads by default
    for name in ("onprem.yaml", "aws.yaml"):  # the cluster files serve it too
        text = (Path(cli.__file__).parent / "cluster" / name).read_text()
        assert f"models/{model_for().name}" in text and "cifar10.pt" not in text
    assert cli.build_parser().parse_args(["make-dev-cert", "--out", "d"]).name is None


def test_health_fails_loudly_where_no_front_serves(capsys):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert cli.main(["health", "--target", f"127.0.0.1:{port}", "--wait", "0"]) == 1
    err = capsys.readouterr().err
    assert "UNAVAILABLE" in err and "not SERVING after 0 s" in err
    assert cli.main(["health", "--target", "10.1.2.3:50051"]) == 2  # plaintext to another host: refused
    assert "--tls-ca" in capsys.readouterr().err
