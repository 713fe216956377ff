"""Export without the model in memory (``pauserec-export --stream``).

The graphs are traced over a *skeleton*: the HF model built from its config with every weight replaced by a
weightless stand-in (a zero-stride view of one number, distinct per weight, so the exporter's merging of equal
initializers cannot mix two of them). Each stand-in remembers where its values are: a tensor of the checkpoint's
safetensors (memory-mapped, bf16 / fp16 / fp32, sharded or not), possibly transposed or a block of its rows. The
exporter writes each initializer by reading that recipe, one tensor at a time (``pauserec.export.onnx``).

What needs real values while the graphs are built reads them the same way: the rows of the embedding and head
the graphs keep (SID rows, the think suffix), and the fused prefix's KV, computed one decoder layer at a time
(``real_layer`` puts a layer's weights in and takes them out again). The HF reference that validation compares
against is computed one layer at a time too (``layerwise_logprobs``): HF's own decoder-layer modules, each with its
real weights only while the recorded sequences pass through it. Peak memory: one layer, the largest tensor being
written (the embedding or head, as float32), and the validation sequences' hidden states. The HF top-k that a
quantized engine's recommendations are compared with is the same kind of pass (``layerwise_topk``: HF ``generate``'s
trie-constrained beam search, one SID level and one decoder layer at a time).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from pauserec.errors import CheckpointError, ExportError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointTensors:
    """The tensors of a checkpoint's safetensors files, read one at a time as float32."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        if (self.path / INDEX_FILE).is_file():
            weight_map = json.loads((self.path / INDEX_FILE).read_text())["weight_map"]
            self.file_of = {name: self.path / f for name, f in weight_map.items()}
        elif (self.path / SINGLE_FILE).is_file():
            with safe_open(str(self.path / SINGLE_FILE), "pt") as f:
                self.file_of = {name: self.path / SINGLE_FILE for name in f.keys()}
        else:
            raise CheckpointError(f"{self.path} has no {SINGLE_FILE} or {INDEX_FILE}: --stream reads safetensors "
                                  "weights; save the model with save_pretrained (safe_serialization), or export "
                                  "without --stream")
    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def get(self, name: str, rows: tuple[int, int] | None = None):
        """Tensor ``name`` (or its rows ``[start, stop)``) as float32, in memory of its own. The file is mapped
        for this read only: pages of a mapping held open would stay resident (and counted) after the read."""
        import torch
        from safetensors import safe_open

        if name not in self.file_of:
            raise CheckpointError(f"{self.path}: the checkpoint has no tensor {name!r}; is it a complete "
                                  "save_pretrained folder of this architecture?")
        with safe_open(str(self.file_of[name]), "pt") as f:
            t = f.get_tensor(name) if rows is None else f.get_slice(name)[rows[0] : rows[1]]
            return t.to(torch.float32) if t.dtype != torch.float32 else t.clone()

    def rows(self, name: str, ids) -> object:
        """(len(ids), H) float32: the rows ``ids`` of a 2-D tensor, read run by run of consecutive ids."""
        import torch

        ids = [int(i) for i in ids]
        out = []
        start = 0
        while start < len(ids):
            stop = start + 1
            while stop < len(ids) and ids[stop] == ids[stop - 1] + 1:
                stop += 1
            out.append(self.get(name, (ids[start], ids[stop - 1] + 1)))
            start = stop
        return torch.cat(out) if out else torch.zeros(0)


def _stand_in(shape, value: float):
    import torch

    return torch.full((), value, dtype=torch.float32).expand(*shape)


def is_stand_in(t) -> bool:
    """A weightless stand-in (or a view of one): zero strides on a tensor of more than one element."""
    return t.dim() > 0 and t.numel() > 1 and all(s == 0 for s in t.stride())


class StreamedWeights:
    """A weightless skeleton of the checkpoint's model and the recipe of every stand-in in it."""

    def __init__(self, path: Path) -> None:
        import torch
        from torch import nn
        from transformers import AutoConfig, AutoModelForCausalLM

        from pauserec.train.model import quiet_hf

        quiet_hf()
        self.ckpt = CheckpointTensors(path)
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
        body = model.model
        body.rotary_emb = type(body.rotary_emb)(config=model.config)  # its inv_freq, computed on the CPU
        self.recipes: dict[int, tuple[str, tuple[int, int] | None, bool]] = {}  # storage -> (tensor, rows, transposed)
        self.name_of: dict[int, str] = {}  # id(stand-in parameter) -> checkpoint tensor
        self._next = 0
        done: dict[int, nn.Parameter] = {}
        names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False) if n in self.ckpt}
        for n, p in model.named_parameters(remove_duplicate=False):  # a tied head reads the embedding's tensor
            names.setdefault(id(p), n)
        for module in model.modules():
            for key, p in list(module._parameters.items()):
                if p is None:
                    continue
                if id(p) not in done:
                    name = names[id(p)]
                    fake = nn.Parameter(self._fresh(p.shape, (name, None, False)), requires_grad=False)
                    self.name_of[id(fake)] = name
                    done[id(p)] = fake
                module._parameters[key] = done[id(p)]
        missing = sorted({n for n in self.name_of.values() if n not in self.ckpt})
        if missing:
            raise CheckpointError(f"{path}: the safetensors lack {len(missing)} tensor(s) the model's config needs "
                                  f"(e.g. {', '.join(missing[:3])}); export without --stream, or re-save the checkpoint")
        self.model = model.eval()
        # int8 / int4: the graphs name each stand-in's recipe (``lazy_ref``) instead of holding its float32 values;
        # the quantizer reads them (``lazy_columns``), so the fp32 weights are never written or held whole
        self.defer = False
        self.lazy: list[tuple[tuple, tuple[int, ...]]] = []  # (recipe, shape)
        self._lazy_index: dict[tuple, int] = {}

    def _fresh(self, shape, recipe):
        self._next += 1
        t = _stand_in(shape, float(self._next))
        self.recipes[t.untyped_storage().data_ptr()] = recipe
        return t

    # -- what the graphs hold -------------------------------------------------------------------------
    def derived(self, weight, rows: tuple[int, int] | None = None):
        """A stand-in for ``weight[rows].T`` (an HF weight of the skeleton, or a block of its rows)."""
        n_out, n_in = weight.shape
        count = n_out if rows is None else min(rows[1], n_out) - rows[0]
        return self._fresh((n_in, count), (self.name_of[id(weight)], rows, True))

    def rows(self, weight, ids):
        """Real (len(ids), H) float32 rows of an HF weight of the skeleton."""
        return self.ckpt.rows(self.name_of[id(weight)], ids)

    def real(self, t) -> np.ndarray:
        """The values a stand-in stands for, as a contiguous float32 array (non-finite values refused)."""
        import torch

        name, rows, transposed = self.recipes[t.untyped_storage().data_ptr()]
        x = self.ckpt.get(name, rows)
        if not bool(torch.isfinite(x).all()):
            raise ExportError(f"the checkpoint has non-finite (NaN/inf) weights in {name}: its training diverged or the "
                              "file is damaged; retrain it (e.g. with a lower --lr) or export an earlier checkpoint")
        x = x.t() if transposed else x
        if tuple(x.shape) != tuple(t.shape):
            raise ExportError(f"{name} has shape {tuple(x.shape)} where the graph expects {tuple(t.shape)}: the "
                              "checkpoint's config.json does not describe its weights")
        return np.ascontiguousarray(x.numpy())

    def lazy_ref(self, t) -> int:
        """The index of stand-in ``t``'s recipe, by which the quantizer reads its values (``lazy_columns``)."""
        recipe = self.recipes[t.untyped_storage().data_ptr()]
        key = (recipe, tuple(t.shape))
        if key not in self._lazy_index:
            self._lazy_index[key] = len(self.lazy)
            self.lazy.append(key)
        return self._lazy_index[key]

    def lazy_columns(self, index: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Columns ``[start, stop)`` of the (K, N) values of lazy recipe ``index`` as contiguous float32 (a
        transposed weight's columns are rows of the checkpoint tensor: only those are read)."""
        import torch

        (name, rows, transposed), shape = self.lazy[index]
        stop = shape[-1] if stop is None else stop
        if transposed:
            first = rows[0] if rows else 0
            x = self.ckpt.get(name, (first + start, first + stop)).t()
        else:
            x = self.ckpt.get(name, rows)
            x = x[..., start:stop] if (start, stop) != (0, shape[-1]) else x
        if not bool(torch.isfinite(x).all()):
            raise ExportError(f"the checkpoint has non-finite (NaN/inf) weights in {name}: its training diverged or the "
                              "file is damaged; retrain it (e.g. with a lower --lr) or export an earlier checkpoint")
        want = (*shape[:-1], stop - start)
        if tuple(x.shape) != want:
            raise ExportError(f"{name} has shape {tuple(x.shape)} where the graph expects {want}: the checkpoint's "
                              "config.json does not describe its weights")
        return np.ascontiguousarray(x.numpy())

    # -- one decoder layer with its real weights --------------------------------------------------------
    @contextmanager
    def real_layer(self, layer, buffers: dict | None = None):
        """Inside: ``layer``'s parameters (an HF module) are real; so are the ``buffers`` ({(module, key): stand-in
        derived from them}). Afterwards the stand-ins are back."""
        from torch import nn

        swapped = []
        try:
            for module in layer.modules():
                for key, p in list(module._parameters.items()):
                    if p is not None and id(p) in self.name_of:
                        real = self.ckpt.get(self.name_of[id(p)])
                        module._parameters[key] = nn.Parameter(real, requires_grad=False)
                        swapped.append((module._parameters, key, p))
            for (module, key), stand_in in (buffers or {}).items():
                name, rows, transposed = self.recipes[stand_in.untyped_storage().data_ptr()]
                real = self.ckpt.get(name, rows)
                module._buffers[key] = real.t() if transposed else real
                swapped.append((module._buffers, key, stand_in))
            yield
        finally:
            for table, key, old in reversed(swapped):
                table[key] = old


def layerwise_logprobs(weights: StreamedWeights, sequences: list[tuple[int, ...]], keep: int) -> dict:
    """HF's forward over each token sequence, one decoder layer at a time (each layer's weights read once for
    all sequences): {sequence: (keep, vocab) float64 log-probs of its last ``keep`` positions}."""
    import torch

    model = weights.model
    body = model.model
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    hidden, pos_emb = {}, {}
    with torch.no_grad():
        for seq in sequences:
            h = weights.rows(embed, list(seq)).unsqueeze(0)  # (1, T, H)
            hidden[seq] = h
            pos_emb[seq] = body.rotary_emb(h, torch.arange(len(seq)).unsqueeze(0))
        for layer in body.layers:
            with weights.real_layer(layer):
                for seq in sequences:
                    out = layer(hidden[seq], attention_mask=None, position_embeddings=pos_emb[seq])
                    hidden[seq] = out[0] if isinstance(out, tuple) else out
        with weights.real_layer(body.norm):
            last = {seq: body.norm(hidden[seq][0, -keep:]) for seq in sequences}  # (keep, H)
        vocab, block = head.shape[0], 8192
        logits = {seq: [] for seq in sequences}
        for start in range(0, vocab, block):
            w = weights.ckpt.get(weights.name_of[id(head)], (start, min(start + block, vocab)))  # (rows, H)
            for seq in sequences:
                logits[seq].append(last[seq] @ w.t())
        return {seq: torch.log_softmax(torch.cat(parts, dim=-1).double(), dim=-1).numpy() for seq, parts in logits.items()}


# -- the HF top-k, one decoder layer at a time ------------------------------------------------------------------
class _LayerCache:
    """The stand-in for an HF cache that one decoder layer's attention calls: ``update`` records the layer's new
    K/V (``key``, ``value``: (rows, Hkv, q, D)) and returns them after ``prefix`` (a user's prompt K/V, (1, Hkv,
    T, D) each, expanded to the rows), so the new tokens attend to the prompt without recomputing it."""

    def __init__(self, prefix: tuple | None = None) -> None:
        self.prefix = prefix
        self.key = self.value = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        import torch

        self.key, self.value = key_states, value_states
        if self.prefix is None:
            return key_states, value_states
        rows = key_states.shape[0]
        pk, pv = (t.expand(rows, -1, -1, -1) for t in self.prefix)
        return torch.cat([pk, key_states], dim=2), torch.cat([pv, value_states], dim=2)


def _cache_keyword(layer) -> str:
    """The name under which this transformers version's decoder layer takes its cache."""
    import inspect

    params = inspect.signature(layer.forward).parameters
    for name in ("cache", "past_key_values", "past_key_value"):
        if name in params:
            return name
    raise ExportError(f"{type(layer).__name__}.forward takes no cache argument (cache / past_key_values) in this "
                      "transformers version, so the layer-by-layer reference cannot run; install the transformers "
                      "version of the train extra, or export without --stream")


def _run_layer(layer, keyword: str, h, position_embeddings, cache: _LayerCache, mask=None):
    out = layer(h, attention_mask=mask, position_embeddings=position_embeddings, **{keyword: cache})
    return out[0] if isinstance(out, tuple) else out


def _head_logprobs(weights: StreamedWeights, x, ids: np.ndarray) -> np.ndarray:
    """(n, len(ids)) float32: log_softmax(x @ head.T) over the full vocabulary, at the token ids ``ids``, for the
    final-normed hidden states ``x`` (n, H). The head is read in row blocks with a running (float64) logsumexp, so
    the (n, vocab) logits are never held at once."""
    import torch

    head = weights.model.get_output_embeddings().weight
    name, vocab, block = weights.name_of[id(head)], head.shape[0], 8192
    ids_t = torch.as_tensor(np.asarray(ids, np.int64))
    n = x.shape[0]
    picked = torch.empty((n, len(ids_t)), dtype=torch.float32)
    peak = torch.full((n,), -float("inf"), dtype=torch.float64)
    total = torch.zeros(n, dtype=torch.float64)
    for start in range(0, vocab, block):
        stop = min(start + block, vocab)
        logits = x @ weights.ckpt.get(name, (start, stop)).t()  # (n, rows) float32
        inside = (ids_t >= start) & (ids_t < stop)
        picked[:, inside] = logits[:, ids_t[inside] - start]
        wide = logits.double()
        new_peak = torch.maximum(peak, wide.max(dim=1).values)
        total = total * torch.exp(peak - new_peak) + torch.exp(wide - new_peak[:, None]).sum(dim=1)
        peak = new_peak
    return (picked.double() - (peak + torch.log(total))[:, None]).float().numpy()


def layerwise_topk(weights: StreamedWeights, prompts: list[np.ndarray], spec, catalog, beams: int, k: int = 10,
                   scoring: str = "full") -> tuple[np.ndarray, np.ndarray]:
    """The HF model's top-k items per prompt, one decoder layer at a time: (B, k) int32 dense item indices (-1
    padding) and (B, k) float32 scores (-inf padding), best first.

    The semantics of :meth:`pauserec.reference.hf_generate.HFBaseline.recommend_prompts` (HF ``generate`` beam search,
    ``num_beams=beams``, ``length_penalty=0``, trie-constrained): a beam's score is the sum over SID levels of the
    chosen SID token's log-prob; each level keeps the best ``beams`` trie children of the live beams (the runtime's
    trie top-k, :func:`pauserec.runtime.trie_topk.trie_topk_numpy`, so exact ties break by parent then code); the
    final beams become items with :func:`~pauserec.reference.hf_generate.rank_items` (a SID's collision group in item
    order). ``prompts``: token ids up to the first SID token, one array per user (``HFBaseline._prompts``).
    ``scoring``: ``full`` = log_softmax over the whole vocabulary at the level's SID tokens (as ``generate``);
    ``sid`` = those log-probs renormalised over the level's codes (:func:`pauserec.runtime.beam.renormalize`).
    Tokens the pipeline scores after the SID (``spec.after_ids``) are one more level each, as in the runtime's
    search (:func:`pauserec.runtime.beam.after_trie`).

    Each decoder layer's weights are read once per SID level for all users: the prompt pass keeps every user's
    prompt K/V of every layer; level l > 1 runs the beams' l - 1 SID tokens through each layer against that K/V
    (an explicit float mask: the prompt wholly visible, causal among the SID tokens). Peak memory: one layer, the
    prompts' K/V and hidden states, a block of the head. direct and pause models only (a cot model's rationale is
    not generated here).
    """
    import torch

    from pauserec.reference.hf_generate import rank_items
    from pauserec.runtime.beam import after_trie, renormalize
    from pauserec.runtime.trie_topk import trie_topk

    if spec.kind == "cot":
        raise ExportError("the layer-by-layer HF reference does not generate rationales, so it cannot rank a cot "
                          "model's items; export cot models without --stream (the HF model in memory), or with "
                          "--stream at fp32")
    if scoring not in ("full", "sid"):
        raise ExportError(f"unknown scoring {scoring!r}: use 'full' (log-softmax over the vocabulary, as HF "
                          "generate) or 'sid' (renormalised over each level's codes)")
    if beams < 1 or k < 1:
        raise ExportError(f"beams ({beams}) and k ({k}) must be at least 1")
    prompts = [np.asarray(p, np.int64).reshape(-1) for p in prompts]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ExportError("layerwise_topk needs at least one prompt, and no empty prompt: pass each user's prompt ids "
                          "up to the first SID token")

    model = weights.model
    body = model.model
    embed = model.get_input_embeddings().weight
    layers = list(body.layers)
    keyword = _cache_keyword(layers[0])
    trie = catalog.trie
    sid_table = spec.sid_table()  # (L, max V) token id of each level's codes
    n_users, n_levels, n_steps = len(prompts), spec.levels, spec.levels + len(spec.after_ids)
    table = np.full((n_steps, sid_table.shape[1]), -1, np.int64)  # + one level per token scored after the SID
    table[:n_levels] = sid_table
    table[n_levels:, 0] = spec.after_ids
    sizes = (*spec.codebook_sizes, *(1,) * len(spec.after_ids))
    lengths = [len(p) for p in prompts]

    def level_logprobs(last, level: int) -> np.ndarray:
        """(n, V_level) log-probs of the level's codes after the hidden states ``last`` (n, H) (before the norm)."""
        with weights.real_layer(body.norm):
            x = body.norm(last)
        lp = _head_logprobs(weights, x, table[level, : sizes[level]])
        return renormalize(lp).astype(np.float32) if scoring == "sid" else lp

    with torch.no_grad():
        # prompt pass: every user's K/V of every layer, and the level-1 log-probs after its last position
        hidden = [weights.rows(embed, p).unsqueeze(0) for p in prompts]  # (1, T, H) each
        rope = [body.rotary_emb(h, torch.arange(len(p)).unsqueeze(0)) for h, p in zip(hidden, prompts)]
        prompt_kv: list[list[tuple]] = [[] for _ in prompts]  # [user][layer] -> (key, value) (1, Hkv, T, D)
        for layer in layers:
            with weights.real_layer(layer):
                for b in range(n_users):
                    cache = _LayerCache()
                    hidden[b] = _run_layer(layer, keyword, hidden[b], rope[b], cache)  # causal: mask None, q = T
                    prompt_kv[b].append((cache.key, cache.value))
        lp = level_logprobs(torch.stack([h[0, -1] for h in hidden]), 0)  # (B, V1)
        del hidden, rope
        sid_trie, past = (trie.offsets, trie.tokens, trie.children), after_trie(len(trie.offsets) - 1)
        top = trie_topk(np.zeros((n_users, 1), np.float32), np.ascontiguousarray(lp[:, None, :], np.float32),
                        np.zeros((n_users, 1), np.int32), *sid_trie, beams, impl="numpy")
        codes = top.token[:, :, None].astype(np.int64)  # (B, K, l) codes chosen so far, -1 on dead beams

        # levels 2..L: the beams' SID tokens so far through each layer, after the user's prompt K/V
        for level in range(1, n_steps):
            q = level
            ids = table[np.arange(q), np.maximum(codes, 0)]  # (B, K, q) token ids; dead beams feed code 0
            uniq, where = np.unique(ids, return_inverse=True)
            rows = weights.rows(embed, uniq)  # (U, H)
            hidden = [rows[torch.as_tensor(where.reshape(ids.shape)[b])] for b in range(n_users)]  # (K, q, H)
            causal = torch.triu(torch.full((q, q), -float("inf")), diagonal=1)  # among the new tokens
            masks, rope = [], []
            for b, t in enumerate(lengths):
                mask = torch.zeros((beams, 1, q, t + q), dtype=torch.float32)
                mask[:, :, :, t:] = causal
                masks.append(mask)
                rope.append(body.rotary_emb(hidden[b], torch.arange(t, t + q).unsqueeze(0)))
            for i, layer in enumerate(layers):
                with weights.real_layer(layer):
                    for b in range(n_users):
                        hidden[b] = _run_layer(layer, keyword, hidden[b], rope[b], _LayerCache(prompt_kv[b][i]),
                                               masks[b])
            lp = level_logprobs(torch.cat([h[:, -1] for h in hidden]), level)  # (B * K, V_level)
            del hidden
            top = trie_topk(top.score, np.ascontiguousarray(lp.reshape(n_users, beams, -1), np.float32), top.node,
                            *(sid_trie if level < n_levels else past), beams, impl="numpy")
            parent = np.maximum(top.parent, 0)[:, :, None]  # padded beams: dead from here on (score -inf)
            codes = np.concatenate([np.take_along_axis(codes, parent, axis=1), top.token[:, :, None]], axis=2)

    seqs = table[np.arange(n_levels), np.maximum(codes[:, :, :n_levels], 0)].tolist()  # [user][beam][level] token ids
    sid_of_tokens = {tuple(int(table[lv, c]) for lv, c in enumerate(sid)): i for i, sid in enumerate(trie.sid_codes)}
    return rank_items(seqs, top.score, sid_of_tokens, trie, k)
