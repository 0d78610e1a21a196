"""``lwqc generate``: greedy text from a compiled causal LM, streamed as it is decoded.

The ONNX backend drives the artifact's KV-cache decoder with the plain ONNX Runtime API
(``backends/decoder_session.py``); the torch backend runs the eager module holding the
artifact's packed weights. Both pick the argmax token at every step, so they agree token for
token up to float rounding. ``--chat`` wraps the prompt in the model's chat template.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from lwqc.artifacts import PLAN_FILE
from lwqc.backends import torch_eager
from lwqc.backends.decoder_session import DecoderSession, is_decoder
from lwqc.evaluate import artifact_weights
from lwqc.ir.errors import LwqcError
from lwqc.ir.hf_load import load_model
from lwqc.ir.onnx_source import is_onnx_file, tokenizer_beside
from lwqc.ir.plan_json import read_artifact_plan, specs_from_document
from lwqc.ir.source import CAUSAL_LM


@dataclasses.dataclass
class GenerateRequest:
    out: Path
    prompt: str
    chat: bool = False
    max_new_tokens: int = 128
    backend: str | None = None  # None: the decoder when the artifact holds one


def _tokenizer(out: Path, model_id: str) -> Any:
    from transformers import AutoTokenizer

    if (out / "tokenizer.json").exists() or (out / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(str(out))
    if is_onnx_file(model_id):
        return tokenizer_beside(Path(model_id))
    return load_model(model_id).tokenizer()


def prompt_ids(tokenizer: Any, prompt: str, chat: bool) -> list[int]:
    """The prompt's token ids, wrapped in the chat template with ``chat``."""
    if not chat:
        return list(tokenizer(prompt)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise LwqcError("the model has no chat template; drop --chat")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                        add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def stop_tokens(tokenizer: Any, eos: Any) -> set[int]:
    ids = set(eos) if isinstance(eos, list) else {eos} if eos is not None else set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def torch_greedy(module: torch.nn.Module, prompt: list[int], max_new_tokens: int,
                 stop: set[int]) -> Iterator[int]:
    """The argmax continuation of ``prompt`` by an HF causal LM, with its own KV cache."""
    ids = torch.tensor([prompt])
    # transformers 5 names the cache argument ``cache``; earlier versions ``past_key_values``
    name = "cache" if "cache" in inspect.signature(module.forward).parameters \
        else "past_key_values"
    past = None
    with torch.no_grad():
        for _ in range(max_new_tokens):
            result = module(input_ids=ids, use_cache=True, **{name: past})
            past = result.past_key_values
            token = int(result.logits[0, -1].argmax())
            yield token
            if token in stop:
                return
            ids = torch.tensor([[token]])


def _token_source(request: GenerateRequest, document: dict[str, Any]
                  ) -> tuple[Callable[[list[int], int, set[int]], Iterator[int]], Any]:
    out = request.out
    backend = request.backend or ("onnx" if is_decoder(out) else "torch")
    if backend == "onnx":
        if not is_decoder(out):
            raise LwqcError(f"{out} holds no KV-cache decoder (compiled with --onnx-graph "
                            "export, or the architecture has none); use --backend torch")
        decoder = DecoderSession(out)
        return decoder.greedy, decoder.eos
    if is_onnx_file(document["model"]["id"]):
        raise LwqcError(f"{out} was compiled from an ONNX file, which torch cannot run: "
                        "generate runs a KV-cache decoder (compile the GenAI builder's decoder, "
                        "or the transformers model)")
    loaded = load_model(document["model"]["id"])
    if loaded.kind != CAUSAL_LM:
        raise LwqcError(f"{out} holds an encoder; lwqc generate needs a causal language model")
    quantized = {s for s, spec in specs_from_document(document).items() if not spec.kept}
    module = torch_eager.build(loaded.module, artifact_weights(out, quantized))
    eos = module.generation_config.eos_token_id if module.generation_config else None

    def greedy(prompt: list[int], max_new_tokens: int, stop: set[int]) -> Iterator[int]:
        return torch_greedy(module, prompt, max_new_tokens, stop)

    return greedy, eos


def generate(request: GenerateRequest, write: Callable[[str], None]) -> list[int]:
    """Stream the continuation's text to ``write``; returns its token ids."""
    out = request.out
    if not (out / PLAN_FILE).exists():
        raise LwqcError(f"{out} is not an lwqc artifact (no {PLAN_FILE}); run lwqc compile first")
    if request.max_new_tokens < 1:
        raise LwqcError("--max-new-tokens must be at least 1")
    document = read_artifact_plan(out / PLAN_FILE)
    greedy, eos = _token_source(request, document)
    tokenizer = _tokenizer(out, document["model"]["id"])
    prompt = prompt_ids(tokenizer, request.prompt, request.chat)
    stop = stop_tokens(tokenizer, eos)
    tokens: list[int] = []
    shown = ""
    for token in greedy(prompt, request.max_new_tokens, stop):
        tokens.append(token)
        text = tokenizer.decode([t for t in tokens if t not in stop], skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # a multi-byte character is complete
            write(text[len(shown):])
            shown = text
    return tokens
