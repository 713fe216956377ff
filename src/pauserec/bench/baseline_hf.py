"""The approach people use today: Hugging Face ``generate(num_beams=K, prefix_allowed_tokens_fn=trie)``.

This is the baseline pauserec is measured against, written the way such code usually is: a nested
dict trie of token ids walked in a Python callback, left-padded batches, the whole prompt prefilled
for every request, and for CoT a greedy ``generate`` up to ``</think>`` followed by a second, beamed
``generate`` over the prompt + rationale. Needs torch and transformers (the ``train`` extra).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pauserec.data.prompts import CARD_FILE, PromptSpec, TrainingCard
from pauserec.errors import CheckpointError


@dataclass
class HFResult:
    item_index: np.ndarray  # (B, k) int32 dense item indices, -1 padding
    scores: np.ndarray  # (B, k) float32 summed log-probs of the SID tokens
    timings: dict[str, float] = field(default_factory=dict)


def build_token_trie(spec: PromptSpec, sid_codes: np.ndarray) -> dict:
    """Nested dict of SID token ids: {tok_l1: {tok_l2: {...}}} over every catalog SID."""
    table = spec.sid_table()
    root: dict = {}
    for codes in np.unique(sid_codes, axis=0):
        node = root
        for level, code in enumerate(codes):
            node = node.setdefault(int(table[level, code]), {})
    return root


class HFBaseline:
    """Loads a checkpoint with transformers and recommends through ``generate``.

    A checkpoint ``pauserec train`` wrote carries its prompt and catalog (its training card). Any other
    checkpoint (trained elsewhere, exported by preset or prompt file) is run on the prompt of ``engine``, the
    engine exported from it: its catalog and, token for token, the prompts that engine feeds its graphs
    (``PromptEncoder.full``), so both systems answer the same prompts. ``prompt_source`` says which it used."""

    def __init__(self, ckpt: str | Path, threads: int | None = None, engine: str | Path | None = None):
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        from pauserec.data.catalog import Catalog

        hf_logging.disable_progress_bar()

        if threads:
            torch.set_num_threads(threads)
        self.ckpt = Path(ckpt)
        self.encoder = None
        if (self.ckpt / CARD_FILE).is_file() or engine is None:
            if not (self.ckpt / CARD_FILE).is_file():
                raise CheckpointError(f"{self.ckpt} has no {CARD_FILE} (it was not trained by `pauserec train`): pass "
                                      "the engine exported from it too; `pauserec-bench latency ENGINE --hf-baseline "
                                      "CKPT` pairs them by the checkpoint's sha256")
            self.card = TrainingCard.load(self.ckpt)
            spec = self.card.prompt
            catalog_path = self.ckpt / "catalog.npz"
            if not catalog_path.is_file():
                raise CheckpointError(f"{catalog_path} not found; re-run `pauserec train` to write it")
            catalog = Catalog.load(catalog_path)
            self.prompt_source = "the checkpoint's training card"
        else:
            from pauserec.runtime import Engine

            e = Engine.load(engine, graphs=False, verify=False)
            spec, catalog, self.encoder = e.prompt, e.catalog, e.encoder
            self.prompt_source = f"the prompt of engine {Path(engine).name} ({spec.assembly} assembly)"
        model = AutoModelForCausalLM.from_pretrained(self.ckpt, dtype=torch.float32).eval()
        self._setup(model, spec, catalog)

    @classmethod
    def from_parts(cls, model, spec: PromptSpec, catalog) -> HFBaseline:
        """The same search over a loaded model (export's reference: prompts from the checkpoint's own tokenizer)."""
        self = cls.__new__(cls)
        self._setup(model, spec, catalog)
        return self

    def _setup(self, model, spec: PromptSpec, catalog) -> None:
        self.model, self.spec, self.catalog = model, spec, catalog
        self.encoder = getattr(self, "encoder", None)
        self.trie = build_token_trie(self.spec, self.catalog.sids)
        table = self.spec.sid_table()
        self._sid_of_tokens = {
            tuple(int(table[lv, c]) for lv, c in enumerate(codes)): i for i, codes in enumerate(self.catalog.trie.sid_codes)
        }

    def _prompts(self, histories: list[np.ndarray]) -> list[np.ndarray]:
        if self.encoder is not None:  # the engine's own prompts (text assembly and chat templates included)
            return [self.encoder.full(np.asarray(h, dtype=np.int64)) for h in histories]
        return [self.spec.prompt_ids(self.catalog.sids[np.asarray(h, dtype=np.int64)]) for h in histories]

    def _left_pad(self, seqs: list[np.ndarray]):
        import torch

        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.spec.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s) :] = torch.as_tensor(s)
            mask[i, width - len(s) :] = 1
        return ids, mask

    def _rationales(self, prompts: list[np.ndarray]) -> list[np.ndarray]:
        """CoT: greedy full-vocabulary rationale up to ``</think>`` (capped, then forced)."""
        ids, mask = self._left_pad(prompts)
        out = self.model.generate(
            input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1,
            max_new_tokens=self.spec.max_rationale, eos_token_id=self.spec.think_end_id,
            pad_token_id=self.spec.pad_id,
        )
        result = []
        for i, p in enumerate(prompts):
            gen = out[i, ids.shape[1] :].tolist()
            if self.spec.think_end_id in gen:
                gen = gen[: gen.index(self.spec.think_end_id)]
            gen = [t for t in gen if t != self.spec.pad_id]
            result.append(np.concatenate([p, np.asarray(gen + [self.spec.think_end_id], dtype=np.int64)]))
        return result

    def recommend(self, histories: list[np.ndarray], k: int = 10, beams: int = 20) -> HFResult:
        """Top-k items per history (dense item indices), via trie-constrained HF beam search."""
        return self.recommend_prompts(self._prompts(histories), k, beams)

    def recommend_prompts(self, prompts: list[np.ndarray], k: int = 10, beams: int = 20) -> HFResult:
        """The same for prompts given as ids (up to the first SID token, or to the rationale for cot)."""
        import torch

        timings: dict[str, float] = {}
        prompts = [np.asarray(p, np.int64) for p in prompts]
        with torch.inference_mode():
            if self.spec.kind == "cot":
                t0 = time.perf_counter()
                prompts = self._rationales(prompts)
                timings["rationale"] = time.perf_counter() - t0
            ids, mask = self._left_pad(prompts)
            width = ids.shape[1]
            trie = self.trie

            def allowed(batch_id: int, input_ids) -> list[int]:
                node = trie
                for tok in input_ids[width:].tolist():
                    node = node.get(tok, {})
                return list(node.keys())

            t0 = time.perf_counter()
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, do_sample=False, num_beams=beams,
                num_return_sequences=beams, max_new_tokens=self.spec.levels, length_penalty=0.0,
                early_stopping=True, prefix_allowed_tokens_fn=allowed, output_scores=True,
                return_dict_in_generate=True, pad_token_id=self.spec.pad_id, eos_token_id=None,
            )
            timings["generate"] = time.perf_counter() - t0
        return self._to_items(out, len(prompts), width, k, beams, timings)

    def _to_items(self, out, batch: int, width: int, k: int, beams: int, timings) -> HFResult:
        seqs = out.sequences[:, width:].reshape(batch, beams, -1).tolist()
        seq_scores = out.sequences_scores.reshape(batch, beams).float().numpy()
        item_index, scores = rank_items(seqs, seq_scores, self._sid_of_tokens, self.catalog.trie, k)
        return HFResult(item_index, scores, timings)


def rank_items(seqs: list, seq_scores: np.ndarray, sid_of_tokens: dict, trie, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Beams' SID token sequences [user][beam][level] + scores (B, beams) -> the top-k items (B, k) int32
    and their scores (B, k) float32, best beam first, collision groups expanded; -1 / -inf padding."""
    batch = len(seqs)
    item_index = np.full((batch, k), -1, np.int32)
    scores = np.full((batch, k), -np.inf, np.float32)
    for b in range(batch):
        ranked: list[tuple[int, float]] = []
        for tokens, score in zip(seqs[b], seq_scores[b]):
            sid = sid_of_tokens.get(tuple(tokens))
            if sid is None or not np.isfinite(score):
                continue
            ranked.extend((int(item), float(score)) for item in trie.items_of_sid(sid))
        for j, (item, score) in enumerate(ranked[:k]):
            item_index[b, j], scores[b, j] = item, score
    return item_index, scores
