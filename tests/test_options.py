"""lra_soft.config.parse_options, the one reader of key=value flags (-o, --data-option, bench --attn NAME:k=v)."""
import pytest
from typer.testing import CliRunner

from cli import app
from lra_soft.bench import parse_specs
from lra_soft.config import parse_options


def test_values_are_literals_else_strings():
    assert parse_options(["num_landmarks=64", "inverse=exact", "ridge=1e-6", "fused=false", "x=None", "v_conv=(0,0,0)",
                          "flag=TRUE", "y=null", "val = test ", "path=a=b"], "-o") == {
        "num_landmarks": 64, "inverse": "exact", "ridge": 1e-6, "fused": False, "x": None, "v_conv": (0, 0, 0),
        "flag": True, "y": None, "val": "test", "path": "a=b"}
    assert parse_options(["s=", "t=[1", "u={[1]: 2}", "seed=1", "seed=2"], "-o") == {
        "s": "", "t": "[1", "u": "{[1]: 2}", "seed": 2}  # a later key wins
    assert parse_options([], "-o") == {}


@pytest.mark.parametrize("item", ["seed", "=1", " =1"])
def test_an_item_without_key_or_equals_names_the_flag_and_the_item(item):
    with pytest.raises(ValueError, match=f"--data-option: {item!r} is not of the form key=value"):
        parse_options(["seed=1", item], "--data-option")


def test_every_caller_reads_none_alike(tmp_path):
    # `seed=None` was the string 'None' under `prepare -o` (now `prepare --data-option`) and None under `train`.
    assert parse_specs(["soft:window=None"])[0].options == {"window": None}
    with pytest.raises(ValueError, match=r"--attn 'soft:window': 'window' is not of the form key=value"):
        parse_specs(["soft:window"])
    runner = CliRunner()
    for command in (["prepare", "listops", "--data-option", "seed=None"],
                    ["train", "listops", "--data-option", "seed=None", "--device", "cpu", "--no-progress"]):
        out = runner.invoke(app, [*command, "--data-dir", str(tmp_path)])
        assert out.exit_code == 1 and "option seed=None of task 'listops' must be of type int" in out.output, out.output
    out = runner.invoke(app, ["train", "listops", "-o", "window", "--data-dir", str(tmp_path)])
    assert out.exit_code == 1 and "--option: 'window' is not of the form key=value" in out.output
