"""Frozen causal LMs: loaded with transformers from a hub id or a local path, or -- the embedded default --
a tiny Llama-architecture model built from a config with a fixed seed and an offline byte-level tokenizer."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import xxhash
from torch import nn

TINY_LLAMA = "tiny-llama-from-config"
TINY_SEED = 1234


@dataclass
class FrozenLM:
    identity: str  # hub id, local path, or TINY_LLAMA
    model: nn.Module
    tokenizer: object
    fingerprint: str  # changes when the weights or the config change

    @property
    def embed_rms(self) -> float:
        weight = self.model.get_input_embeddings().weight
        return float(weight.pow(2).mean().sqrt())


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: 256 byte tokens + specials, built without any download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in ("<pad>", "<s>", "</s>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def tiny_llama(tokenizer) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        # With the usual 0.02 an untrained model's logits are nearly uniform whatever its input, so no prefix can
        # steer it and the demo's loss stays flat; 0.1 gives a frozen model whose output a learned prefix can move.
        initializer_range=0.1,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):  # building it must not move the run's RNG
        torch.manual_seed(TINY_SEED)
        return LlamaForCausalLM(config)


def load_frozen_lm(model_id: str | None) -> FrozenLM:
    """Load and freeze an LLM (``eval()``, ``requires_grad_(False)``); ``None`` gives the tiny default."""
    if model_id is None:
        tokenizer = byte_tokenizer()
        model = tiny_llama(tokenizer)
        identity = TINY_LLAMA
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_id)
        model = AutoModelForCausalLM.from_pretrained(model_id, torch_dtype=torch.float32)
        identity = model_id
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    model.requires_grad_(False)
    return FrozenLM(identity, model, tokenizer, fingerprint(model))


def fingerprint(model: nn.Module) -> str:
    """xxh3-128 of the config and the input/output embedding weights: cheap even for an 8B model, and any
    different checkpoint of the same architecture changes it."""
    h = xxhash.xxh3_128()
    config = getattr(model, "config", None)
    h.update(json.dumps(config.to_dict() if config is not None else {}, sort_keys=True, default=str).encode())
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None:
            h.update(module.weight.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()
