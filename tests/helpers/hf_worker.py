"""A tiny Llama (built from a config, dropout on) trained by ``transformers.Trainer`` under
``telepathy.hf_trainer.train_preemptible``, for tests/loop/test_hf_trainer.py.

    python tests/helpers/hf_worker.py OUTPUT_DIR STEP_DELAY [--term_at N] [--stop_at N] [--kill_in_save_at N]
        [--save_total_limit K]

Prints ``step N loss HEX`` per step; when training finishes, writes OUTPUT_DIR/final.pt (model state).
``--term_at N``: SIGTERM to itself at step N, right after telepathy's callback saw the step end (so it acts at the
next one, or after the last); ``--stop_at N``: another callback ends training at step N (as early stopping does);
``--kill_in_save_at N``: SIGKILL to itself in the save of step N, before telepathy's callback seals it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from telepathy import training_signals

training_signals.install_signal_handlers()  # before the heavy imports

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from telepathy.hf_trainer import PreemptionCallback, train_preemptible  # noqa: E402


class KillInSave(TrainerCallback):
    def __init__(self, step: int | None) -> None:
        self.step = step

    def on_save(self, args, state, control, **kw):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class Report(TrainerCallback):
    def __init__(self, delay: float, term_at: int | None = None, stop_at: int | None = None) -> None:
        self.delay, self.term_at, self.stop_at = delay, term_at, stop_at

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            print(f"step {state.global_step} loss {float(logs['loss']).hex()}", flush=True)

    def on_step_end(self, args, state, control, **kw):
        time.sleep(self.delay)
        if state.global_step == self.stop_at:
            control.should_training_stop = True
        if state.global_step in (self.term_at, self.stop_at):
            os.kill(os.getpid(), signal.SIGTERM)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("delay", type=float)
    for flag in ("--term_at", "--stop_at", "--kill_in_save_at", "--save_total_limit"):
        parser.add_argument(flag, type=int)
    flags = parser.parse_args()
    out, delay = flags.out, flags.delay
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attention_dropout=0.1)  # fmt: skip
    model = LlamaForCausalLM(config)
    data = torch.Generator().manual_seed(1)
    samples = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (96, 16), generator=data)]
    args = TrainingArguments(output_dir=out, max_steps=24, per_device_train_batch_size=8, logging_steps=1,
                             save_strategy="steps", save_steps=10, learning_rate=3e-3, seed=0, use_cpu=True,
                             report_to=[], disable_tqdm=True, dataloader_num_workers=0,
                             save_total_limit=flags.save_total_limit)  # fmt: skip
    callbacks = [KillInSave(flags.kill_in_save_at), PreemptionCallback(), Report(delay, flags.term_at, flags.stop_at)]
    trainer = Trainer(model=model, args=args, train_dataset=samples, callbacks=callbacks)
    code = train_preemptible(trainer)
    if code == 0:
        torch.save(model.state_dict(), f"{out}/final.pt")
    print(f"exit {code} at step {trainer.state.global_step}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
