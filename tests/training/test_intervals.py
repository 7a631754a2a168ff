"""The interval fields' special values: our checkpoint_interval_steps = -1 never checkpoints by step count, and the
NVIDIA example's ckpt_save_interval / eval_interval / log_interval keep the meaning its training loop gives them."""

import gin
import pytest

from hstu.training.config import parse_gin
from hstu.training.policies import Schedule

EXAMPLE = ["TrainerArgs.train_batch_size=8", "TrainerArgs.eval_batch_size=8", "DatasetArgs.dataset_name='ml-1m'",
           "DatasetArgs.max_history_seqlen=20", "NetworkArgs.num_position_buckets=512"]


@pytest.fixture(autouse=True)
def _clear_gin():
    yield
    gin.clear_config()


def _due(schedule, steps=12, evals=(4, 8)):
    """(steps checkpointed by step count, evaluations followed by a checkpoint) over ``steps`` steps."""
    by_step = [s for s in range(1, steps + 1) if schedule.checkpoint_due_after_step(s, stop=False)]
    after_eval = [s for s in evals if schedule.checkpoint_due_after_eval(stop=False)]
    return by_step, after_eval


@pytest.mark.parametrize("interval, expected", [(None, ([], [4, 8])), (5, ([5, 10], [])), (-1, ([], []))])
def test_checkpoint_cadence(interval, expected):
    assert _due(Schedule(10, 4, 0, interval, None)) == expected


def test_minus_one_never_checkpoints_and_zero_is_refused():
    args = parse_gin([], ["TrainerArgs.checkpoint_interval_steps=-1"])
    assert args.trainer.checkpoint_interval_steps == -1 and args.trainer.save_final_checkpoint
    for bad in (0, -2):
        with pytest.raises(ValueError, match=r"TrainerArgs\.checkpoint_interval_steps must be -1 \(never\) or >= 1"):
            parse_gin([], [f"TrainerArgs.checkpoint_interval_steps={bad}"])


@pytest.mark.parametrize("value, interval", [(-1, -1), (0, -1), (-7, -1), (6, 6)])
def test_ckpt_save_interval_of_the_example(value, interval):
    # The example saves before step N when N * interval > 0 and N % interval == 0, and never at the end otherwise.
    t = parse_gin([], EXAMPLE + [f"TrainerArgs.ckpt_save_interval={value}"]).trainer
    assert (t.checkpoint_interval_steps, t.save_final_checkpoint) == (interval, False)
    assert _due(Schedule.of(t))[0] == ([6, 12] if value > 0 else [])


@pytest.mark.parametrize("value, steps", [(0, None), (3, 3)])
def test_eval_interval_zero_means_no_periodic_evaluation(value, steps):
    t = parse_gin([], EXAMPLE + [f"TrainerArgs.eval_interval={value}"]).trainer
    assert (t.eval_interval_steps, t.eval_every_epochs) == (steps, 0)
    schedule = Schedule.of(t)
    assert [s for s in range(1, 10) if schedule.eval_due_after_step(s, last_step=False)] == \
        ([] if value == 0 else [3, 6, 9])


@pytest.mark.parametrize("binding, field", [("TrainerArgs.eval_interval=-1", "TrainerArgs.eval_interval"),
                                            ("TrainerArgs.log_interval=0", "TrainerArgs.log_interval"),
                                            ("TrainerArgs.log_interval=-1", "TrainerArgs.log_interval")])
def test_intervals_the_example_cannot_use_are_named_errors(binding, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.") + " must be >= "):
        parse_gin([], EXAMPLE + [binding])
