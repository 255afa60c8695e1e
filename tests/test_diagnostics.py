from typer.testing import CliRunner

from cli import app
from lra_soft.attention.diagnostics import residual_table


def test_residual_table_spectral_beats_paper_at_equal_iterations():
    rows = {r["init"]: r for r in residual_table([64], [20], batch=2)}
    assert rows["spectral"]["iters=20"] < rows["paper"]["iters=20"] < 0.05
    assert rows["paper"]["cond"] > 10


def test_newton_residual_command():
    result = CliRunner().invoke(app, ["newton-residual", "--landmarks", "16", "--iters", "5,20"])
    assert result.exit_code == 0, result.output
    assert "| 16 | paper |" in result.output and "| 16 | spectral |" in result.output
