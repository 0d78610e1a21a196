"""Drive an artifact's KV-cache decoder with the plain ONNX Runtime API.

The decoder (``genai_config.json`` beside ``model.onnx``) takes ``input_ids``, an
``attention_mask`` over past and new tokens and one key and one value cache per layer
(``[batch, kv_heads, past, head_size]``), and returns ``logits`` and the present caches.
``prefill`` runs a prompt on an empty cache; ``greedy`` continues it token by token.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from lwqc.backends.onnx_rewrite import session

CONFIG_FILE = "genai_config.json"


def is_decoder(directory: Path) -> bool:
    return (directory / CONFIG_FILE).exists()


class DecoderSession:
    def __init__(self, directory: Path, threads: int | None = None) -> None:
        config = json.loads((directory / CONFIG_FILE).read_text())["model"]
        decoder = config["decoder"]
        self.eos = config.get("eos_token_id")
        self.kv_heads, self.head_size = decoder["num_key_value_heads"], decoder["head_size"]
        layers = range(decoder["num_hidden_layers"])
        names, outputs = decoder["inputs"], decoder["outputs"]
        # cache names, key and value of each layer in turn; outputs in the same order
        self.past = [name % i for i in layers
                     for name in (names["past_key_names"], names["past_value_names"])]
        self.outputs = ["logits", *(name % i for i in layers for name in (
            outputs["present_key_names"], outputs["present_value_names"]))]
        self.session = session(directory / decoder["filename"], threads=threads)
        self.inputs = {i.name for i in self.session.get_inputs()}

    def _empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        empty = np.zeros((batch, self.kv_heads, 0, self.head_size), np.float32)
        return dict.fromkeys(self.past, empty)

    def run(self, input_ids: np.ndarray, cache: dict[str, np.ndarray],
            attention_mask: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Logits of the new tokens and the cache holding past and new ones."""
        feeds = {"input_ids": input_ids.astype(np.int64),
                 "attention_mask": attention_mask.astype(np.int64), **cache}
        logits, *present = self.session.run(self.outputs, {k: v for k, v in feeds.items()
                                                           if k in self.inputs})
        return logits, dict(zip(self.past, present, strict=True))

    def prefill(self, input_ids: np.ndarray) -> np.ndarray:
        """Logits of every position of ``[batch, seq]`` ids, from an empty cache."""
        logits, _ = self.run(input_ids, self._empty_cache(len(input_ids)),
                             np.ones_like(input_ids))
        return logits

    def greedy(self, prompt: list[int], max_new_tokens: int,
               stop: set[int] | None = None) -> Iterator[int]:
        """The argmax continuation of ``prompt``, one token at a time (stops after a token
        in ``stop``)."""
        ids = np.asarray([prompt], np.int64)
        cache, length = self._empty_cache(1), len(prompt)
        for _ in range(max_new_tokens):
            logits, cache = self.run(ids, cache, np.ones((1, length), np.int64))
            token = int(np.argmax(logits[0, -1]))
            yield token
            if stop and token in stop:
                return
            ids, length = np.asarray([[token]], np.int64), length + 1
