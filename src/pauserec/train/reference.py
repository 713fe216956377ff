"""PyTorch reference recommender: exact trie-constrained beam search (batched over users).

Scoring convention (shared with the exported engines): the log-prob of SID code ``c`` at level
``l`` is ``log_softmax(logits over the FULL vocabulary)[sid_token_ids[l][c]]``; a beam's score is
the sum of its L log-probs. Per level the best K (parent beam, child code) pairs among the trie's
valid children are kept: higher score first, ties -> lower parent beam, then lower code; fewer
than K valid candidates -> padding (parent/token/node -1, score -inf). With K >= the number of
SIDs the search is exhaustive: it returns every SID with the same score as teacher forcing.

cot models first write a rationale greedily over the full vocabulary after ``<think>`` until they
emit ``</think>`` (at most ``PromptSpec.max_rationale`` tokens, then ``</think>`` is forced); the
beams start after that. Ranked SIDs are expanded to items by the collision rule of
``pauserec.metrics`` (group order = ascending item index, truncated to N).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from pauserec.errors import PauserecError
from pauserec.metrics import expand_sids
from pauserec.train.model import cache_kwargs, load_checkpoint, output_cache


class TopK(NamedTuple):
    parent: object  # (B, k) long
    token: object  # (B, k) long
    node: object  # (B, k) long
    score: object  # (B, k) float32


@dataclass
class Recommendations:
    items: np.ndarray  # (B, N) int64 dense items, -1 pads
    scores: np.ndarray  # (B, N) float32 score of each item's SID
    sids: np.ndarray  # (B, K) int64 SID ids (trie leaves - level_starts[L]) in rank order, -1 pads
    sid_scores: np.ndarray  # (B, K) float32
    sid_codes: np.ndarray  # (B, K, L) int64 codes, -1 pads
    rationales: list[list[int]] | None = None  # cot: generated rationale ids (without </think>)


def child_tables(trie) -> list[np.ndarray]:
    """Per depth d < L: dense (nodes at depth d, V) table of child node id per code (-1: no child)."""
    ls, off = trie.level_starts, trie.offsets
    tables = []
    for d in range(trie.levels):
        lo, hi = int(ls[d]), int(ls[d + 1])
        e_lo, e_hi = int(off[lo]), int(off[hi])
        V = int(trie.tokens[e_lo:e_hi].max()) + 1
        table = np.full((hi - lo, V), -1, dtype=np.int64)
        src = np.repeat(np.arange(lo, hi), np.diff(off[lo : hi + 1])) - lo  # (E_d,) parent of each edge
        table[src, trie.tokens[e_lo:e_hi]] = trie.children[e_lo:e_hi]
        tables.append(table)
    return tables


def trie_topk_torch(scores, logprobs, nodes, table, level_start: int, k: int) -> TopK:
    """Best k (parent, code) pairs among valid children. scores (B,Kin), logprobs (B,Kin,V), nodes (B,Kin)."""
    import torch

    B, K_in, V = logprobs.shape
    tab = torch.as_tensor(table)
    w = min(V, tab.shape[1])
    child = torch.full((B, K_in, V), -1, dtype=torch.long)
    alive = nodes >= 0
    child[..., :w] = torch.where(alive[..., None], tab[(nodes - level_start).clamp(min=0)][..., :w], -1)
    cand = scores[..., None] + logprobs  # (B, K_in, V)
    cand = torch.where((child >= 0) & ~torch.isnan(cand), cand, float("-inf")).reshape(B, K_in * V)
    order = torch.sort(cand, dim=1, descending=True, stable=True).indices[:, :k]  # ties: lower flat index
    top = cand.gather(1, order)  # (B, k')
    ok = top > float("-inf")
    parent = torch.where(ok, order // V, -1)
    token = torch.where(ok, order % V, -1)
    node = torch.where(ok, child.reshape(B, -1).gather(1, order), -1)
    if order.shape[1] < k:  # fewer candidates than k at all: pad
        pad = k - order.shape[1]
        parent, token, node = (torch.cat([t, t.new_full((B, pad), -1)], 1) for t in (parent, token, node))
        top = torch.cat([top, top.new_full((B, pad), float("-inf"))], 1)
    return TopK(parent, token, node, top.float())


def left_pad(seqs, pad_id: int):
    """(ids, mask, positions), each (B, T): left-padded so every prompt ends at the last column."""
    import torch

    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, T - len(s) :] = torch.as_tensor(np.asarray(s, dtype=np.int64))
        mask[b, T - len(s) :] = 1
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    return ids, mask, pos


class ReferenceRecommender:
    """Trie-constrained beam search over a causal LM, the prompt spec and the catalog's trie."""

    def __init__(self, model, spec, catalog, beams: int = 20, top_n: int = 10, encoder=None):
        if beams < 1 or top_n < 1:
            raise PauserecError(f"beams and top_n must be >= 1 (got {beams}, {top_n})")
        self.model, self.spec, self.catalog = model.eval(), spec, catalog
        self.encoder = encoder  # a PromptEncoder (declared --prompt layouts, text assembly); None: the spec's ids
        self.beams, self.top_n = beams, top_n
        self.trie = catalog.trie
        self.tables = child_tables(self.trie)
        self.sid_table = spec.sid_table()  # (L, Vmax)

    @classmethod
    def from_checkpoint(cls, path, beams: int = 20, top_n: int = 10) -> ReferenceRecommender:
        ck = load_checkpoint(path)
        return cls(ck.model, ck.spec, ck.catalog, beams, top_n)

    # -- model steps ---------------------------------------------------------------------------
    def _step(self, ids, mask, pos, cache=None):
        """Forward new tokens; -> (full-vocab log-probs of the last position (B, V) float32, cache)."""
        import torch

        with torch.no_grad():
            out = self.model(
                input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **cache_kwargs(self.model, cache)
            )
        return torch.log_softmax(out.logits[:, -1].float(), dim=-1), output_cache(out)

    def prompts(self, histories) -> list[np.ndarray]:
        """Prompt ids of each history (dense item indices), up to the constant think suffix."""
        if self.encoder is not None:
            return [self.encoder.full(np.asarray(h, dtype=np.int64)) for h in histories]
        return [self.spec.prompt_ids(self.catalog.sids[np.asarray(h, dtype=np.int64)]) for h in histories]

    def rationales(self, prompts) -> list[list[int]]:
        """cot: greedy full-vocab rationale per prompt until ``</think>`` (capped; ``</think>`` excluded)."""
        import torch

        ids, mask, pos = left_pad(prompts, self.spec.pad_id)
        lp, cache = self._step(ids, mask, pos)
        B, out = len(prompts), [[] for _ in prompts]
        done = torch.zeros(B, dtype=torch.bool)
        for step in range(self.spec.max_rationale):
            nxt = lp.argmax(-1)  # (B,)
            done |= nxt == self.spec.think_end_id
            for b in torch.nonzero(~done).flatten().tolist():
                out[b].append(int(nxt[b]))
            if bool(done.all()) or step == self.spec.max_rationale - 1:
                break
            mask = torch.cat([mask, (~done).long()[:, None]], 1)
            pos = pos[:, -1:] + 1
            lp, cache = self._step(torch.where(done, self.spec.pad_id, nxt)[:, None], mask, pos, cache)
        return out

    def beam_search(self, prefixes):
        """Beam search after complete prefixes -> (sids (B,K), scores (B,K), codes (B,K,L)) as tensors."""
        import torch

        spec, K, L = self.spec, self.beams, self.spec.levels
        table = torch.as_tensor(self.sid_table)  # (L, Vmax)
        ids, mask, pos = left_pad(prefixes, spec.pad_id)
        B = len(prefixes)
        lp, cache = self._step(ids, mask, pos)  # (B, V)
        scores = torch.zeros(B, 1)
        nodes = torch.zeros(B, 1, dtype=torch.long)
        codes = torch.zeros(B, 1, 0, dtype=torch.long)
        ls = [int(x) for x in self.trie.level_starts]
        for level in range(L):
            V_l = len(spec.sid_token_ids[level])
            level_lp = lp.reshape(B, -1, lp.shape[-1])[..., table[level, :V_l]]  # (B, K_in, V_l)
            top = trie_topk_torch(scores, level_lp, nodes, self.tables[level], ls[level], K)
            parent = top.parent.clamp(min=0)  # (B, K)
            codes = torch.cat([codes.gather(1, parent[..., None].expand(-1, -1, codes.shape[2])), top.token[..., None]], 2)
            scores, nodes = top.score, top.node
            if level == L - 1:
                break
            if level == 0:
                cache.batch_repeat_interleave(K)
                mask, pos = mask.repeat_interleave(K, 0), pos.repeat_interleave(K, 0)
            else:
                cache.reorder_cache((torch.arange(B)[:, None] * K + parent).flatten())
            tok = table[level, top.token.clamp(min=0)].reshape(B * K, 1)  # chosen code -> token id
            mask = torch.cat([mask, torch.ones(B * K, 1, dtype=torch.long)], 1)
            pos = pos[:, -1:] + 1
            lp, cache = self._step(tok, mask, pos, cache)  # (B*K, V)
        sids = torch.where(nodes >= 0, nodes - ls[L], -1)
        codes = torch.where((nodes >= 0)[..., None], codes, -1)
        return sids, scores, codes

    # -- public ----------------------------------------------------------------------------------
    def recommend(self, histories) -> Recommendations:
        """Top-N items (collision groups expanded) with scores and the ranked SIDs, per history."""
        prompts = self.prompts(histories)
        rats = None
        if self.spec.kind == "cot":
            rats = self.rationales(prompts)
            prompts = [np.concatenate([p, np.asarray(r, np.int64), self.spec.rationale_end]) for p, r in zip(prompts, rats, strict=True)]
        sids, scores, codes = self.beam_search(prompts)
        sids, scores, codes = sids.numpy(), scores.numpy().astype(np.float32), codes.numpy()
        t = self.trie
        items = expand_sids(sids, t.sid_item_offsets, t.sid_items, self.top_n)
        item_scores = np.full(items.shape, -np.inf, dtype=np.float32)
        sid_of_item = np.empty(self.catalog.n_items, dtype=np.int64)
        sid_of_item[t.sid_items] = np.repeat(np.arange(len(t.sid_codes)), np.diff(t.sid_item_offsets))
        for u in range(len(items)):
            score_of = dict(zip(sids[u].tolist(), scores[u].tolist(), strict=True))
            for j, it in enumerate(items[u]):
                if it >= 0:
                    item_scores[u, j] = score_of[int(sid_of_item[it])]
        return Recommendations(items, item_scores, sids, scores, codes, rats)


def exhaustive_scores(model, spec, trie, prefix, batch: int = 256) -> np.ndarray:
    """Teacher-forced score (sum of L full-vocab log-probs) of every SID of the trie after ``prefix``: (S,)."""
    import torch

    table = spec.sid_table()
    codes = np.asarray(trie.sid_codes, dtype=np.int64)  # (S, L)
    tokens = table[np.arange(spec.levels)[None, :], codes]  # (S, L)
    prefix = np.asarray(prefix, dtype=np.int64)
    P, out = len(prefix), []
    for lo in range(0, len(tokens), batch):
        chunk = torch.as_tensor(tokens[lo : lo + batch])
        ids = torch.cat([torch.as_tensor(prefix).expand(len(chunk), -1), chunk], 1)  # (b, P+L)
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits[:, P - 1 : -1].float()  # (b, L, V)
        lp = torch.log_softmax(logits, -1).gather(2, chunk[..., None])[..., 0]  # (b, L)
        out.append(lp.sum(1).numpy())
    return np.concatenate(out).astype(np.float32)


def evaluate(rec: ReferenceRecommender, dataset, split: str = "test", limit: int | None = None,
             batch_size: int = 32, max_history: int = 20, progress: bool = False) -> dict:
    """Hit/NDCG@5/10 (items and SIDs), invalid rate and the popularity baseline on a split."""
    import time

    from pauserec.errors import DataError
    from pauserec.metrics import popularity_metrics, summarize

    splits = dataset.splits(max_history)
    if split not in ("test", "valid"):
        raise DataError(f"unknown split {split!r}; use test or valid")
    samples = getattr(splits, split)
    n = len(samples) if limit is None else min(limit, len(samples))
    if n == 0:
        raise DataError(f"the {split} split of {dataset.name!r} is empty; nothing to evaluate")
    hists, targets = samples.histories[:n], np.asarray(samples.targets[:n])
    order = np.argsort([len(h) for h in hists], kind="stable")  # similar lengths batch together
    items = np.full((n, rec.top_n), -1, dtype=np.int64)
    sids = np.full((n, rec.beams), -1, dtype=np.int64)
    codes = np.full((n, rec.beams, rec.spec.levels), -1, dtype=np.int64)
    rat_len, t0 = [], time.perf_counter()
    bar = _bar(n) if progress else None
    with bar or _NullBar():
        for lo in range(0, n, batch_size):
            idx = order[lo : lo + batch_size]
            r = rec.recommend([hists[i] for i in idx])
            items[idx], sids[idx], codes[idx] = r.items, r.sids, r.sid_codes
            if r.rationales is not None:
                rat_len += [len(x) for x in r.rationales]
            if bar:
                bar.update(bar.task_ids[0], advance=len(idx))
    wall = time.perf_counter() - t0
    trie = rec.trie
    target_sids = np.array([trie.sid_id(c) for c in rec.catalog.sids[targets]], dtype=np.int64)
    out = summarize(items, targets, sids, target_sids, codes, rec.catalog.sids)
    out.update(split=split, beams=rec.beams, top_n=rec.top_n, wall_time_s=round(wall, 2),
               users_per_s=round(n / wall, 2), kind=rec.spec.kind)
    if rat_len:
        out["mean_rationale_tokens"] = float(np.mean(rat_len))
    pop = popularity_metrics(dataset.sequences, rec.catalog.n_items, targets, split)
    out["popularity"] = pop
    return out


def _bar(total: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    p = Progress(TextColumn("[bold]eval"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"),
                 TimeRemainingColumn())
    p.add_task("eval", total=total)
    return p


class _NullBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def check_index(ck, dataset) -> None:
    """The dataset's SID index must be the one the checkpoint was trained on (CheckpointError if not)."""
    from pauserec.errors import CheckpointError
    from pauserec.train.tokenizer import check_sid_tokens

    check_sid_tokens(ck.tokenizer, dataset.catalog)  # names SID tokens the model has never seen
    if dataset.catalog != ck.catalog:
        raise CheckpointError(
            f"the SID index of {dataset.name!r} ({dataset.index or 'default'}) differs from the catalog this "
            f"checkpoint was trained on (index {ck.card.index!r}); pass --index {ck.card.index or 'NAME'}"
        )


def evaluate_checkpoint(ckpt, data, index: str | None = None, split: str = "test", beams: int = 20,
                        limit: int | None = None, batch_size: int = 32, top_n: int = 10,
                        progress: bool = False) -> dict:
    """Load a checkpoint and a dataset, check they match, and evaluate (see ``evaluate``)."""
    from pauserec.data import load_dataset

    ck = load_checkpoint(ckpt)
    dataset = load_dataset(data, index)
    check_index(ck, dataset)
    rec = ReferenceRecommender(ck.model, ck.spec, ck.catalog, beams=beams, top_n=top_n)
    out = evaluate(rec, dataset, split, limit, batch_size, ck.spec.max_history, progress)
    out.update(checkpoint=str(ck.path), dataset=dataset.name, index=index or dataset.index or "default")
    out["train"] = {k: ck.card.train.get(k) for k in ("kind", "pause_k", "epochs", "steps", "final_loss", "wall_time_s")}
    return out
