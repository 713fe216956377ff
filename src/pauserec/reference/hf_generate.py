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

from pauserec.prompt.spec import CARD_FILE, PromptSpec, TrainingCard
from pauserec.errors import CheckpointError


@dataclass
class HFResult:
    item_index: np.ndarray  # (B, k) int32 dense item indices, -1 padding
    scores: np.ndarray  # (B, k) float32 summed log-probs of the SID tokens
    timings: dict[str, float] = field(default_factory=dict)


def build_token_trie(spec: PromptSpec, sid_codes: np.ndarray) -> dict:
    """Nested dict of token ids: {tok_l1: {tok_l2: {...}}} over every catalog SID, each followed by the tokens
    the pipeline generates after it (``spec.after_ids``: forced, one allowed token per step)."""
    table = spec.sid_table()
    root: dict = {}
    for codes in np.unique(sid_codes, axis=0):
        node = root
        for level, code in enumerate(codes):
            node = node.setdefault(int(table[level, code]), {})
        for tok in spec.after_ids:
            node = node.setdefault(int(tok), {})
    return root


def generate_ends(spec: PromptSpec) -> dict:
    """``generate``'s length and stop token as the pipeline sets them: the SID and what it scores after it; EOS
    ends a beam when the pipeline's target ends with it (otherwise no stop token: every beam runs its length)."""
    eos = spec.eos_id if spec.after_ids and spec.after_ids[-1] == spec.eos_id else None
    return {"max_new_tokens": spec.levels + len(spec.after_ids), "eos_token_id": eos}


@dataclass
class BaselinePrompt:
    """What a baseline feeds its model: the prompt spec, the catalog and, for a checkpoint trained elsewhere,
    the encoder of the engine exported from it (text assembly and chat templates included); ``source`` says
    which. Every baseline (HF ``generate``, optimum, ONNX Runtime GenAI, OpenVINO GenAI) takes its prompts here."""

    spec: PromptSpec
    catalog: object  # pauserec.data.catalog.Catalog
    encoder: object | None
    source: str

    def ids(self, histories: list[np.ndarray]) -> list[np.ndarray]:
        """Prompt ids per history of dense item indices, up to the first SID token (the rationale for cot)."""
        if self.encoder is not None:  # the engine's own prompts
            return [self.encoder.full(np.asarray(h, dtype=np.int64)) for h in histories]
        return [self.spec.prompt_ids(self.catalog.sids[np.asarray(h, dtype=np.int64)]) for h in histories]

    def sid_tokens(self) -> list[tuple[int, ...]]:
        """The token ids of each distinct catalog SID, in the trie's SID order."""
        table = self.spec.sid_table()
        return [tuple(int(table[lv, c]) for lv, c in enumerate(codes)) for codes in self.catalog.trie.sid_codes]


def baseline_prompt(ckpt: str | Path, engine: str | Path | None = None) -> BaselinePrompt:
    """The prompt of a checkpoint ``pauserec train`` wrote (its training card and catalog), or, for any other
    checkpoint, the prompt and catalog of ``engine``, the engine exported from it, so that both systems
    answer the same prompts token for token."""
    from pauserec.data.catalog import Catalog

    ckpt = Path(ckpt)
    if (ckpt / CARD_FILE).is_file() or engine is None:
        if not (ckpt / CARD_FILE).is_file():
            raise CheckpointError(f"{ckpt} has no {CARD_FILE} (it was not trained by `pauserec train`): pass "
                                  "the engine exported from it too; `pauserec-bench latency ENGINE --hf-baseline "
                                  "CKPT` pairs them by the checkpoint's sha256")
        spec = TrainingCard.load(ckpt).prompt
        catalog_path = ckpt / "catalog.npz"
        if not catalog_path.is_file():
            raise CheckpointError(f"{catalog_path} not found; re-run `pauserec train` to write it")
        return BaselinePrompt(spec, Catalog.load(catalog_path), None, "the checkpoint's training card")
    from pauserec.runtime import Engine

    e = Engine.load(engine, graphs=False, verify=False)
    return BaselinePrompt(e.prompt, e.catalog, e.encoder,
                          f"the prompt of engine {Path(engine).name}: {e.prompt.describe()}")


class HFBaseline:
    """Loads a checkpoint with transformers and recommends through ``generate``.

    A checkpoint ``pauserec train`` wrote carries its prompt and catalog (its training card). Any other
    checkpoint (trained elsewhere, exported by preset or prompt file) is run on the prompt of ``engine``, the
    engine exported from it (``baseline_prompt``); ``prompt_source`` says which it used."""

    def __init__(self, ckpt: str | Path, threads: int | None = None, engine: str | Path | None = None):
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        if threads:
            torch.set_num_threads(threads)
        self.ckpt = Path(ckpt)
        prompt = baseline_prompt(self.ckpt, engine)
        self.encoder, self.prompt_source = prompt.encoder, prompt.source
        model = AutoModelForCausalLM.from_pretrained(self.ckpt, dtype=torch.float32).eval()
        self._setup(model, prompt.spec, prompt.catalog)

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
        self.prompt = BaselinePrompt(spec, catalog, self.encoder, getattr(self, "prompt_source", ""))
        self._sid_of_tokens = {t: i for i, t in enumerate(self.prompt.sid_tokens())}

    def _prompts(self, histories: list[np.ndarray]) -> list[np.ndarray]:
        return self.prompt.ids(histories)

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
        """CoT: greedy full-vocabulary rationale up to ``</think>`` (capped, then forced), then the text the pipeline
        forces after it (``spec.rationale_end``)."""
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
            result.append(np.concatenate([p, np.asarray(gen + list(self.spec.rationale_end), dtype=np.int64)]))
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
                num_return_sequences=beams, length_penalty=0.0, early_stopping=True, prefix_allowed_tokens_fn=allowed,
                output_scores=True, return_dict_in_generate=True, pad_token_id=self.spec.pad_id,
                **generate_ends(self.spec),
            )
            timings["generate"] = time.perf_counter() - t0
        return self._to_items(out, len(prompts), width, k, beams, timings)

    def _to_items(self, out, batch: int, width: int, k: int, beams: int, timings) -> HFResult:
        levels = self.spec.levels  # (the tokens after the SID are scored, not part of it)
        seqs = [[t[:levels] for t in user] for user in out.sequences[:, width:].reshape(batch, beams, -1).tolist()]
        seq_scores = out.sequences_scores.reshape(batch, beams).float().numpy()
        item_index, scores = rank_items(seqs, seq_scores, self._sid_of_tokens, self.catalog.trie, k)
        return HFResult(item_index, scores, timings)


def rank_items(seqs: list, seq_scores: np.ndarray | None, sid_of_tokens: dict, trie, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Beams' SID token sequences [user][beam][level], best first, + their scores (B, beams) -> the top-k items
    (B, k) int32 and their scores (B, k) float32, collision groups expanded in catalog order; -1 / -inf padding.
    Sequences that are not catalog SIDs are skipped (an unconstrained search returns them), and so is a SID
    seen before; ``seq_scores`` None (a runtime that returns no beam scores): the items' scores are NaN."""
    batch = len(seqs)
    item_index = np.full((batch, k), -1, np.int32)
    scores = np.full((batch, k), -np.inf, np.float32)
    for b in range(batch):
        ranked: list[tuple[int, float]] = []
        seen: set[int] = set()
        for j, tokens in enumerate(seqs[b]):
            score = np.nan if seq_scores is None else float(seq_scores[b][j])
            sid = sid_of_tokens.get(tuple(int(t) for t in tokens))
            if sid is None or sid in seen or (seq_scores is not None and not np.isfinite(score)):
                continue
            seen.add(sid)
            ranked.extend((int(item), score) for item in trie.items_of_sid(sid))
        for j, (item, score) in enumerate(ranked[:k]):
            item_index[b, j], scores[b, j] = item, score
    return item_index, scores
