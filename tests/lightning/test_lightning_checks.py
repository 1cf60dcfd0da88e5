"""fit_preemptible in this process (tests/helpers/lightning_models.py): configurations it refuses before training,
checkpoints that do not fit, a finished run, ``lightning.pt`` read by Lightning's own loader, and a re-sealed
``lightning.pt`` that would run code when unpickled: skipped, never executed."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from adversary import Payload, reseal, save_raw
from torch.utils.data import DataLoader

from telepathy.errors import EXIT_CANNOT_RESUME, EXIT_COMPLETE, EXIT_USAGE, UsageError

pytestmark = pytest.mark.slow
# Lightning is imported by the tests, not at collection: `pytest -m "not slow"` must not pay seconds for it.


@pytest.fixture(scope="module", autouse=True)
def _lightning():
    global L, SLURMEnvironment, EveryOther, Losses, Net, NoisyPoints, PreemptionCallback, fit_preemptible
    import lightning.pytorch as L  # noqa: PLC0415
    from lightning.fabric.plugins.environments import SLURMEnvironment  # noqa: PLC0415
    from lightning_models import EveryOther, Losses, Net, NoisyPoints  # noqa: PLC0415

    from telepathy.lightning import PreemptionCallback, fit_preemptible  # noqa: PLC0415


def trainer(*callbacks, **settings):
    settings = {"max_epochs": 1, "accelerator": "cpu", "devices": 1, **settings}
    return L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     limit_val_batches=0, callbacks=list(callbacks), **settings)  # fmt: skip


def loader(batch_size: int = 8, **settings) -> DataLoader:
    return DataLoader(NoisyPoints(), batch_size=batch_size, **({"shuffle": True} | settings))


def committed(save_dir: Path) -> list[str]:
    return sorted(p.name for p in (save_dir / "checkpoints").glob("step_*"))


def test_a_sampler_it_cannot_resume_is_refused_before_training_and_allowed_only_when_asked(tmp_path, caplog):
    model = Net()
    with caplog.at_level(logging.ERROR, logger="telepathy"):
        code = fit_preemptible(trainer(), model, loader(sampler=EveryOther(96), shuffle=False), save_dir=tmp_path)
    assert code == EXIT_USAGE and model.steps_run == 0
    assert "sampler is a EveryOther" in caplog.text and "allow_inexact_data=True" in caplog.text
    assert not (tmp_path / "emergency").exists() and committed(tmp_path) == []  # a refusal is not a failure
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="telepathy"):
        code = fit_preemptible(trainer(), model, loader(sampler=EveryOther(96), shuffle=False),
                               save_dir=tmp_path / "inexact", allow_inexact_data=True)  # fmt: skip
    assert code == EXIT_COMPLETE and model.steps_run == 12 and "inexact" in caplog.text


@pytest.mark.parametrize("named", ["SLURMEnvironment(auto_requeue=True)", "ddp_spawn"])
def test_lightning_settings_that_would_fight_telepathy_are_refused(tmp_path, caplog, named):
    if named == "ddp_spawn":
        settings = {"strategy": "ddp_spawn", "devices": 2}
    else:
        settings = {"plugins": [SLURMEnvironment(auto_requeue=True)]}
    model = Net()
    with caplog.at_level(logging.ERROR, logger="telepathy"):
        assert fit_preemptible(trainer(**settings), model, loader(), save_dir=tmp_path) == EXIT_USAGE
    assert named in caplog.text and model.steps_run == 0


def test_slurm_environment_without_auto_requeue_is_fine(tmp_path):
    run = trainer(plugins=[SLURMEnvironment(auto_requeue=False)])
    assert fit_preemptible(run, Net(), loader(), save_dir=tmp_path) == EXIT_COMPLETE


def test_the_callback_alone_under_trainer_fit_is_refused(tmp_path):
    with pytest.raises(UsageError, match="fit_preemptible"):
        trainer(PreemptionCallback(tmp_path)).fit(Net(), loader())
    assert committed(tmp_path) == []


def test_a_finished_run_resumes_to_nothing_and_changed_data_or_model_is_refused(tmp_path, caplog):
    assert fit_preemptible(trainer(), Net(), loader(), save_dir=tmp_path) == EXIT_COMPLETE
    again = Net()
    assert fit_preemptible(trainer(), again, loader(), save_dir=tmp_path) == EXIT_COMPLETE
    assert again.steps_run == 0
    with caplog.at_level(logging.ERROR, logger="telepathy"):
        code = fit_preemptible(trainer(max_epochs=2), Net(), loader(batch_size=4), save_dir=tmp_path)
    assert code == EXIT_CANNOT_RESUME and "the training data changed" in caplog.text
    caplog.clear()
    other = Net(hidden=16)
    with caplog.at_level(logging.ERROR, logger="telepathy"):
        code = fit_preemptible(trainer(max_epochs=2), other, loader(), save_dir=tmp_path)
    assert code == EXIT_CANNOT_RESUME and other.steps_run == 0
    assert "lightning.pt: it does not fit this model" in caplog.text and "net.0.weight" in caplog.text


def test_lightning_pt_is_a_lightning_checkpoint_with_non_plain_hyperparameters_as_text(tmp_path, caplog):
    model = Net(tag=Path("somewhere"))
    with caplog.at_level(logging.WARNING, logger="telepathy"):
        assert fit_preemptible(trainer(), model, loader(), save_dir=tmp_path) == EXIT_COMPLETE
    assert "/hyper_parameters/tag" in caplog.text
    loaded = Net.load_from_checkpoint(tmp_path / "latest" / "lightning.pt", weights_only=True)
    assert loaded.hparams.tag == "somewhere"
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_a_resealed_lightning_pt_that_would_run_code_is_skipped_for_the_older_checkpoint(tmp_path, caplog):
    first = Losses()
    model = Net()
    assert fit_preemptible(trainer(first), model, loader(), save_dir=tmp_path, every_steps=4) == EXIT_COMPLETE
    assert committed(tmp_path) == ["step_00000004", "step_00000008", "step_00000012"]
    newest = tmp_path / "checkpoints" / "step_00000012"
    marker = tmp_path / "code-ran"
    save_raw(newest / "lightning.pt", {"state_dict": Payload(str(marker)), "loops": {}})
    reseal(newest)  # byte-for-byte valid again: only loading it safely protects the run
    second, resumed = Losses(), Net()
    with caplog.at_level(logging.WARNING, logger="telepathy"):
        assert fit_preemptible(trainer(second), resumed, loader(), save_dir=tmp_path) == EXIT_COMPLETE
    assert not marker.exists()
    assert "skipping checkpoint" in caplog.text and "step_00000012" in caplog.text
    assert sorted(second.by_step) == [9, 10, 11, 12]  # resumed from step 8
    assert all(first.by_step[s] == second.by_step[s] for s in second.by_step)  # the replay is bit-identical
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), model.state_dict().values()))


def test_a_run_stopped_by_max_steps_mid_epoch_continues_exactly_with_gradient_accumulation(tmp_path):
    """max_steps ends training in the middle of an epoch (Lightning then marks the epoch finished, so the final
    checkpoint is taken at the last step boundary instead); a longer run resumes from it. Two batches per step."""
    torch.manual_seed(0)
    reference, model = Losses(), Net()
    run = trainer(reference, max_epochs=2, accumulate_grad_batches=2)
    assert fit_preemptible(run, model, loader(), save_dir=tmp_path / "reference") == EXIT_COMPLETE
    torch.manual_seed(0)
    first = Losses()
    run = trainer(first, max_epochs=2, max_steps=4, accumulate_grad_batches=2)
    assert fit_preemptible(run, Net(), loader(), save_dir=tmp_path / "run") == EXIT_COMPLETE
    assert committed(tmp_path / "run") == ["step_00000004"]  # 8 of the first epoch's 12 batches
    second, resumed = Losses(), Net()  # initialised differently: the checkpoint's weights replace it
    run = trainer(second, max_epochs=2, accumulate_grad_batches=2)
    assert fit_preemptible(run, resumed, loader(), save_dir=tmp_path / "run") == EXIT_COMPLETE
    assert resumed.steps_run == 24 - 8 and {**first.by_step, **second.by_step} == reference.by_step
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), model.state_dict().values()))
