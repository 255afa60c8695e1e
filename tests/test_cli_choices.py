"""The CLI's closed choices are Literal types that --help and errors list; --device is checked by the resolver;
`imagenet train` takes its defaults from ImageNetConfig."""
import dataclasses
import typing

import pytest
import torch
import typer
from typer.testing import CliRunner

import cli
from cli import app
from lra_soft import protocol as P
from lra_soft.bench.attention import DTYPES
from lra_soft.encoder import POOLINGS
from lra_soft.imagenet import ImageNetConfig
from lra_soft.vision import PRESETS

runner = CliRunner()


def _flat(text: str) -> str:
    """Output with the error panel's borders and line breaks removed (it wraps at the terminal's width)."""
    return " ".join(text.replace("│", " ").split())


def test_choices_match_what_the_library_accepts():
    assert typing.get_args(cli.Pooling) == POOLINGS
    assert set(typing.get_args(cli.ProtocolName)) == set(P.PROTOCOLS)
    assert typing.get_args(cli.Precision) == P.PRECISIONS
    assert typing.get_args(cli.DType) == tuple(DTYPES)
    assert typing.get_args(cli.Backbone) == tuple(PRESETS)


@pytest.mark.parametrize("args, listed", [
    (["train", "listops", "--pooling", "max"], "'max' is not one of 'mean', 'mean_padded', 'cls'"),
    (["train", "listops", "--protocol", "harness"], "'harness' is not one of 'paper', 'clean'"),
    (["train", "listops", "--precision", "fp8"], "'fp8' is not one of 'fp16', 'bf16', 'fp32'"),
    (["eval", "listops", "--checkpoint", "x.pt", "--split", "dev"], "'dev' is not one of 'val', 'test'"),
    (["bench", "--dtype", "float8"], "'float8' is not one of 'float32', 'float64', 'bfloat16', 'float16'"),
    (["bench", "--autocast", "fp16"], "'fp16' is not one of 'none', 'bfloat16', 'float16'"),
    (["bench", "--model", "gpt"], "'gpt' is not one of 'none', 'lra', 'imagenet'"),
    (["bench", "--preset", "fig2"], "'fig2' is not one of 'fig1b'"),
    (["imagenet", "train", "--data", ".", "--model", "soft_nano"], "'soft_nano' is not one of 'soft_tiny'"),
])
def test_a_value_outside_the_choices_is_a_usage_error_listing_them(args, listed):
    out = runner.invoke(app, [*args, "--device", "cpu"])
    assert out.exit_code == 2 and listed in _flat(out.output), out.output


def test_help_lists_the_choices():
    out = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "250"})
    for listed in ("mean|mean_padded|cls", "paper|clean", "fp16|bf16|fp32", "auto, cpu, cuda or cuda:N"):
        assert listed in out.output, listed
    out = runner.invoke(app, ["imagenet", "train", "--help"], env={"COLUMNS": "250"})
    assert "soft_tiny|soft_small|soft_medium|soft_large|soft_huge" in out.output


def test_device_is_checked_before_anything_runs(tmp_path, monkeypatch):
    out = runner.invoke(app, ["train", "listops", "--device", "tpu", "--data-dir", str(tmp_path / "d")])
    assert out.exit_code == 1 and out.output.strip() == "error: --device 'tpu' is not one of auto, cpu, cuda or cuda:N"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = runner.invoke(app, ["bench", "--device", "cuda:0", "--out", str(tmp_path / "b")])
    assert out.exit_code == 1 and "--device cuda:0 asks for CUDA, but torch sees no CUDA device" in out.output
    assert len(out.output.strip().splitlines()) == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    data = ["--data-dir", str(tmp_path / "d")]
    for command in (["train", "listops", *data], ["eval", "listops", "--checkpoint", "x.pt", *data],
                    ["bench", "--out", str(tmp_path / "b")], ["imagenet", "train", "--data", "."],
                    ["imagenet", "eval", "x.pt", "--data", "."]):
        out = runner.invoke(app, [*command, "--device", "cuda:1"])
        assert out.exit_code == 1, (command, out.output)
        assert "--device cuda:1: this machine has 1 CUDA device(s), cuda:0 to cuda:0" in out.output, command
    assert not (tmp_path / "d").exists() and not (tmp_path / "b").exists()


def test_imagenet_train_defaults_are_imagenet_config_defaults():
    command = typer.main.get_command(app).commands["imagenet"].commands["train"]
    recipe = ImageNetConfig()
    fields = {f.name for f in dataclasses.fields(ImageNetConfig)}
    shown = {p.name: p.default for p in command.params if p.name in fields}
    assert len(shown) == 19 and shown == {name: getattr(recipe, name) for name in shown}
