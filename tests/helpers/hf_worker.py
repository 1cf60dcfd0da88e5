"""A tiny Llama (built from a config, dropout on) trained by ``transformers.Trainer`` under
``telepathy.hf_trainer.train_preemptible``, for tests/loop/test_hf_trainer.py.

    python tests/helpers/hf_worker.py OUTPUT_DIR STEP_DELAY

Prints ``step N loss HEX`` per step; when training finishes, writes OUTPUT_DIR/final.pt (model state).
"""

from __future__ import annotations

import sys
import time

from telepathy import training_signals

training_signals.install_signal_handlers()  # before the heavy imports

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from telepathy.hf_trainer import train_preemptible  # noqa: E402


class Report(TrainerCallback):
    def __init__(self, delay: float) -> None:
        self.delay = delay

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            print(f"step {state.global_step} loss {float(logs['loss']).hex()}", flush=True)

    def on_step_end(self, args, state, control, **kw):
        time.sleep(self.delay)


def main() -> int:
    out, delay = sys.argv[1], float(sys.argv[2])
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attention_dropout=0.1)  # fmt: skip
    model = LlamaForCausalLM(config)
    data = torch.Generator().manual_seed(1)
    samples = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (96, 16), generator=data)]
    args = TrainingArguments(output_dir=out, max_steps=24, per_device_train_batch_size=8, logging_steps=1,
                             save_strategy="steps", save_steps=10, learning_rate=3e-3, seed=0, use_cpu=True,
                             report_to=[], disable_tqdm=True, dataloader_num_workers=0)  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=samples, callbacks=[Report(delay)])
    code = train_preemptible(trainer)
    if code == 0:
        torch.save(model.state_dict(), f"{out}/final.pt")
    print(f"exit {code} at step {trainer.state.global_step}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
