"""Question-answering data: a synthetic set generated deterministically from a seed (the default, no
downloads), or a local SQuAD-format JSON file."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from torch.utils.data import Dataset

from telepathy.errors import UsageError
from telepathy.latentwire.model import PAD_BYTE

NAMES = ["Alice", "Bob", "Chen", "Dana", "Emil", "Fatima", "Goran", "Hana", "Ivan", "Jun", "Kofi", "Lena"]
CITIES = ["Paris", "Lagos", "Lima", "Oslo", "Seoul", "Quito", "Cairo", "Perth", "Riga", "Hanoi"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "purple", "orange"]
PETS = ["cat", "dog", "parrot", "rabbit", "turtle", "hamster"]


def synthetic_qa(samples: int, seed: int) -> list[dict[str, str]]:
    """``samples`` (context, question, answer) triples, a pure function of ``seed``."""
    rng = random.Random(seed)
    out = []
    for _ in range(samples):
        name = rng.choice(NAMES)
        facts = {"city": rng.choice(CITIES), "color": rng.choice(COLORS), "pet": rng.choice(PETS)}
        other = rng.choice([n for n in NAMES if n != name])
        sentences = [
            f"{name} lives in {facts['city']}.",
            f"{name}'s favourite colour is {facts['color']}.",
            f"{name} has a {facts['pet']}.",
            f"{other} lives in {rng.choice(CITIES)}.",
        ]
        rng.shuffle(sentences)
        key = rng.choice(sorted(facts))
        question = {"city": f"Where does {name} live?", "color": f"What is {name}'s favourite colour?",
                    "pet": f"What pet does {name} have?"}[key]  # fmt: skip
        out.append({"context": " ".join(sentences), "question": question, "answer": facts[key]})
    return out


def squad_qa(path: str | Path, samples: int | None = None) -> list[dict[str, str]]:
    """Read a SQuAD v1/v2-format JSON file (first answer of each answerable question)."""
    try:
        doc = json.loads(Path(path).read_text())
        out = [
            {"context": para["context"], "question": qa["question"], "answer": qa["answers"][0]["text"]}
            for article in doc["data"]
            for para in article["paragraphs"]
            for qa in para["qas"]
            if qa.get("answers")
        ]
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise UsageError(f"{path} is not a readable SQuAD-format JSON file ({exc!r}); see --data_path") from None
    if not out:
        raise UsageError(f"{path} holds no answerable questions; see --data_path")
    return out[:samples] if samples else out


class QADataset(Dataset):
    def __init__(self, items: list[dict[str, str]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, str]:
        return self.items[index]


def prompt_bytes(items: list[dict[str, str]], max_bytes: int) -> torch.Tensor:
    """Padded UTF-8 bytes of "context + question" for the encoder."""
    encoded = [f"{it['context']} Question: {it['question']}".encode()[:max_bytes] for it in items]
    width = max(len(e) for e in encoded)
    batch = torch.full((len(encoded), width), PAD_BYTE, dtype=torch.long)
    for row, data in enumerate(encoded):
        batch[row, : len(data)] = torch.tensor(list(data), dtype=torch.long)
    return batch


def collate(items: list[dict[str, str]]) -> list[dict[str, str]]:
    return items
