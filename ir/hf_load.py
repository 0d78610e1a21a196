"""Load a model as float32 through transformers: an HF directory, a hub id, or a GGUF file.

GGUF files go through transformers' GGUF reader, which dequantizes every tensor to float32
(it needs the ``gguf`` and ``accelerate`` packages: the ``gguf`` extra). The model id recorded
in plans is the resolved path (or the hub id), so ``lwqc eval`` can load the same weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lwqc.ir.errors import ModelLoadError
from lwqc.ir.source import CAUSAL_LM, ENCODER

GGUF_SUFFIX = ".gguf"
GGUF_PACKAGES = ("gguf", "accelerate")


@dataclasses.dataclass
class LoadedModel:
    """A float32 module and where it came from."""

    module: torch.nn.Module
    kind: str  # CAUSAL_LM or ENCODER
    model_id: str
    trust_remote_code: bool = False

    @property
    def gguf(self) -> bool:
        return self.model_id.endswith(GGUF_SUFFIX)

    def _pretrained_args(self) -> tuple[str, dict[str, Any]]:
        if self.gguf:
            path = Path(self.model_id)
            return str(path.parent), {"gguf_file": path.name}
        return self.model_id, {"trust_remote_code": self.trust_remote_code}

    def tokenizer(self):
        """The model's own tokenizer; ``ModelLoadError`` if it has none."""
        from transformers import AutoTokenizer

        where, extra = self._pretrained_args()
        try:
            return AutoTokenizer.from_pretrained(where, **extra)
        except (OSError, ValueError, TypeError):
            raise ModelLoadError(f"{self.model_id} has no tokenizer; this step needs one") from None

    def tokenize(self, text: str) -> np.ndarray:
        """Token ids of ``text`` (no special tokens)."""
        ids = self.tokenizer()(text, add_special_tokens=False)["input_ids"]
        return np.asarray(ids, np.int64)

    @property
    def context_length(self) -> int | None:
        return getattr(self.module.config, "max_position_embeddings", None)


def _looks_like_path(model: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else that names no file is a bad path."""
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or model.endswith(
        GGUF_SUFFIX)


def _is_causal_lm(config, auto_causal) -> bool:
    """Causal when the checkpoint says so (``*ForCausalLM``, ``*LMHeadModel``); encoders such
    as ``BertModel`` stay encoders even though their config also maps to a causal head."""
    architectures = getattr(config, "architectures", None) or []
    if architectures:
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    return type(config) in auto_causal._model_mapping


def _quiet_transformers():
    import transformers

    logging.getLogger("transformers").setLevel(logging.ERROR)
    transformers.utils.logging.disable_progress_bar()
    return transformers


def _load_gguf(path: Path) -> LoadedModel:
    missing = [name for name in GGUF_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelLoadError(f"reading {path.name} needs the package(s) {', '.join(missing)}: "
                             "pip install 'lwqc[gguf]'")
    transformers = _quiet_transformers()
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # the GGUF reader's own progress bar
            loaded = transformers.AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ModelLoadError(f"cannot read GGUF file {path}: {first}") from None
    # The GGUF reader marks its result as quantized (and not savable); a fresh module of the
    # same config without that mark, holding the dequantized weights, is an ordinary float model.
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)
    config = type(loaded.config).from_dict(settings)
    with torch.device("meta"):
        module = type(loaded)(config)
    module.load_state_dict(loaded.state_dict(), assign=True)
    persistent = set(module.state_dict())
    for name, buffer in loaded.named_buffers():  # the state dict lacks RoPE tables and such
        if name not in persistent:
            owner, _, attribute = name.rpartition(".")
            module.get_submodule(owner).register_buffer(attribute, buffer, persistent=False)
    module.tie_weights()
    return LoadedModel(module.eval(), CAUSAL_LM, str(path.resolve()))


def load_model(model: str, trust_remote_code: bool = False) -> LoadedModel:
    """Load ``model`` (HF directory, hub id or ``.gguf`` file) as float32."""
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == GGUF_SUFFIX:
        return _load_gguf(path)
    if path.exists():
        if not path.is_dir() or not (path / "config.json").exists():
            raise ModelLoadError(
                f"{model} is neither a Hugging Face model directory (no config.json) nor a "
                "GGUF file; pass the directory that holds config.json and *.safetensors, or a "
                ".gguf file"
            )
        model_id = str(path.resolve())
    elif _looks_like_path(model):
        raise ModelLoadError(f"model path {model} does not exist; check the path")
    else:
        model_id = model
    transformers = _quiet_transformers()
    common = {"trust_remote_code": trust_remote_code, "use_safetensors": True,
              "dtype": torch.float32}
    try:
        config = transformers.AutoConfig.from_pretrained(
            model_id, trust_remote_code=trust_remote_code
        )
        if _is_causal_lm(config, transformers.AutoModelForCausalLM):
            module = transformers.AutoModelForCausalLM.from_pretrained(model_id, **common)
            kind = CAUSAL_LM
        else:
            module, kind = transformers.AutoModel.from_pretrained(model_id, **common), ENCODER
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"cannot load {model}: {first} (lwqc loads safetensors checkpoints and GGUF files)"
        ) from None
    except ValueError as exc:
        raise ModelLoadError(f"unsupported model {model}: {str(exc).splitlines()[0]}") from None
    return LoadedModel(module.eval(), kind, model_id, trust_remote_code)


def weights_sha256(module: torch.nn.Module) -> str:
    """Hash of every tensor in the state dict (name, dtype, shape, bytes), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        flat = tensor.detach().contiguous().cpu().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
