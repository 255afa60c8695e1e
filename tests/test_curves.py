"""The learning curve (``lra_soft.curves``) of a short and of a long run: honest axes, the run named in the title."""
import json
import math

import pytest

from lra_soft.curves import moving_average, plot_learning_curve

CONFIG = {"task": "listops", "model": {"attention": "soft", "attention_options": {"num_landmarks": 64}},
          "train": {"protocol": "paper"}}


def _run(tmp_path, steps: int, eval_every: int, per_step: bool = True):
    run = tmp_path / f"run-{steps}"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(CONFIG))
    loss = [2.3 - 0.3 * (1 - math.exp(-s / 100)) for s in range(1, steps + 1)]
    if per_step:
        (run / "steps.jsonl").write_text("".join(json.dumps({"step": s, "loss": v}) + "\n"
                                                 for s, v in enumerate(loss, 1)))
    evals = [s for s in range(1, steps + 1) if s % eval_every == 0 or s == steps]
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": loss[s - 1], "val_acc": 0.17 + s / 1e4})
                                               + "\n" for s in evals) + '{"step": 9')  # a line cut by a kill
    return run


@pytest.mark.parametrize("steps, eval_every, per_step", [(3, 1, True), (300, 50, True), (300, 50, False)])
def test_curve_has_honest_axes_and_names_the_run(tmp_path, steps, eval_every, per_step):
    run = _run(tmp_path, steps, eval_every, per_step)
    fig = plot_learning_curve(run)
    assert (run / "learning_curve.png").stat().st_size > 10_000
    ax_loss, ax_acc = fig.axes
    assert ax_acc.get_ylim() == (0, 100)  # accuracy on 0-100%, however little it moves
    assert ax_loss.get_ylim()[0] == 0 and ax_loss.get_ylim()[1] >= max(ax_loss.get_lines()[0].get_ydata())
    assert fig._suptitle.get_text() == f"run-{steps}: listops / soft (num_landmarks=64) / protocol paper"
    lines = ax_loss.get_lines()
    assert len(lines[-1].get_xdata()) == (steps if per_step else len(range(eval_every, steps + 1, eval_every)))
    acc = ax_acc.get_lines()[0].get_ydata()
    assert acc[-1] == pytest.approx(100 * (0.17 + steps / 1e4))


def test_moving_average():
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
