"""Our own torch graph wrappers around the weights of an HF Qwen2 / Qwen3 / Llama causal LM.

Three graphs share one ``Core`` (embedding, decoder layers, final norm, LM head, RoPE):

* ``PrefillGraph``: history ids + mask -> log-probs of the first SID level (full vocabulary for cot)
  + context KV. The instruction prefix's KV is a graph constant; the think suffix is a constant
  appended after each row's last real history token. (``fuse_prefix=False``, an ablation of that
  idea: each row runs the instruction tokens through the layers again; same outputs.)
* ``DecodeGraph``: one SID token per beam -> log-probs over the next level's codes. It attends to the
  per-user context KV (never copied per beam) and to the beams' own short KV, with one joint softmax.
* ``ThinkGraph`` (cot): one full-vocabulary step extending the per-user context.

Layout of every context: [prefix (constant)][history T slots][suffix S slots][rationale slots (cot)];
a key is visible when its slot is valid and its position is not after the query's. Positions are
prefix 0..P-1, then P + (number of valid context slots before it), so right padding costs nothing.

The decoder layers reuse the HF modules (projections, norms, MLP), so biases, Qwen3 q/k norms and
activations follow the checkpoint; attention and RoPE are written here.

Scoring rules (``SCORING``), recorded in the manifest:

* ``full``: a SID token's log-prob is ``log_softmax`` over the whole vocabulary, as HF ``generate``
  ranks (exact parity); every step multiplies by the full ``vocab x hidden`` head.
* ``sid``: only the rows of the level's codebook are computed (``V_l x hidden``) and normalised over
  that level, as the specialised SID engines do.

Head blocks: the head is stored as column blocks of ``HEAD_BLOCK`` tokens, each its own weight and its
own MatMul (``Core.split_head``), so a runtime that repacks weights holds one block twice while it loads,
never the whole ``vocab x hidden`` matrix; and a SID level's log-prob under ``full`` is its codebook rows'
logit minus the log-normaliser (a ``logsumexp`` per block, then over the blocks), so no step keeps a
``(rows, vocab)`` tensor beyond one block's. (Not when a tied cot engine embeds through the head.)

Token lookup: direct and pause graphs only ever embed SID tokens, separators and the think suffix, so
they keep just those rows (``Core.restrict_embedding``); with the ``sid`` rule such an engine holds no
vocabulary-sized matrix at all. cot embeds rationale tokens, so it keeps the whole table; when it is
tied, the lookup reads the head's ``W^T`` (a column gather), the bytes the exporter folds for the
head, so the engine stores one copy (``pauserec.export.weights`` stores equal tensors once).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from pauserec.errors import CheckpointError, ExportError

SUPPORTED_ARCHS = ("qwen2", "qwen3", "llama")
SUPPORTED_ROPE = ("default", "linear", "llama3", "yarn")
SCORING = ("full", "sid")
NEG = -1e9  # masked attention score (finite: a fully masked row stays NaN-free)
HEAD_BLOCK = 8192  # vocabulary columns per head block (Core.split_head)
# The graphs' constants the export computes (the fused prefix's KV), not weights of the checkpoint: a bf16 engine
# keeps them in float32 (rounding them would move every score).
COMPUTED_CONSTANTS = ("prefix_key", "prefix_value")


@dataclass(frozen=True)
class ModelDims:
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    vocab: int
    arch: str
    intermediate: int = 0
    tied: bool = False

    @property
    def group(self) -> int:
        return self.q_heads // self.kv_heads


def model_dims(model) -> ModelDims:
    """Check that ``model`` is an architecture we can export and return its sizes."""
    cfg = model.config
    arch = getattr(cfg, "model_type", "?")
    if arch not in SUPPORTED_ARCHS:
        raise CheckpointError(
            f"unsupported architecture {arch!r}: pauserec exports {', '.join(SUPPORTED_ARCHS)} causal LMs; "
            "convert the model to one of these or train one with `pauserec train`"
        )
    layer_types = getattr(cfg, "layer_types", None) or []
    if getattr(cfg, "use_sliding_window", False) and "sliding_attention" in layer_types:
        raise ExportError("sliding-window attention is not supported by the export; set use_sliding_window=false")
    rope_type = getattr(model.model.rotary_emb, "rope_type", "default")
    if rope_type not in SUPPORTED_ROPE:
        raise ExportError(
            f"RoPE scaling type {rope_type!r} is not supported (position-dependent); supported: "
            f"{', '.join(SUPPORTED_ROPE)}. Export a checkpoint with one of these rope_parameters."
        )
    q_heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    if q_heads % kv_heads:
        raise CheckpointError(f"num_attention_heads={q_heads} is not a multiple of num_key_value_heads={kv_heads}")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // q_heads
    return ModelDims(
        layers=cfg.num_hidden_layers,
        q_heads=q_heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        hidden=cfg.hidden_size,
        vocab=model.get_output_embeddings().weight.shape[0],
        arch=arch,
        intermediate=int(getattr(cfg, "intermediate_size", 0) or 0),
        tied=model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr(),
    )


def _rotate_half(x: torch.Tensor, half: int) -> torch.Tensor:
    """(-x2, x1) of x = (x1, x2) along its last axis of 2 * ``half`` (a constant: a traced ``x.shape`` is not)."""
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _joint_attention(parts: list[tuple[torch.Tensor, torch.Tensor, tuple | None]], shape) -> torch.Tensor:
    """Softmax over several key blocks at once, without concatenating the score blocks.

    ``shape``: the output's (..., M, D). ``parts``: (scores (*rows, N_i) with masked keys already at NEG, values,
    rows) triples, ``scores @ values`` broadcastable; ``rows`` is None when the scores' leading shape is the
    output's (..., M), else that leading shape (its product the same rows in another layout), and the part is
    viewed to the output's layout. Every shape here is the caller's (sizes it read once per graph), never read
    off a tensor: a traced ``x.shape`` costs a chain of Shape / Gather / Unsqueeze / Concat operators per use.
    """
    out_rows = tuple(shape[:-1])

    def to_out(x, rows, last):  # (*rows, last) -> (*out_rows, last)
        return x if rows is None else x.reshape(*out_rows, last)

    peak = None  # (..., M, 1)
    for scores, _, rows in parts:
        p = to_out(scores.amax(dim=-1, keepdim=True), rows, 1)
        peak = p if peak is None else torch.maximum(peak, p)
    total, den = 0, 0
    for scores, values, rows in parts:
        e = torch.exp(scores - (peak if rows is None else peak.reshape(*rows, 1)))
        den = den + to_out(e.sum(dim=-1, keepdim=True), rows, 1)
        total = total + to_out(e @ values, rows, shape[-1])
    return total / den


class Core(nn.Module):
    """Embedding, decoder layers, final norm and head of an HF causal LM, with our attention + RoPE."""

    def __init__(self, model, weights=None) -> None:
        """``weights``: a ``pauserec.export.stream.StreamedWeights`` whose skeleton ``model`` is (weightless
        stand-ins, real values read when needed), or None: ``model`` holds its weights."""
        super().__init__()
        self.weights = weights
        self.dims = model_dims(model)
        body = model.model
        self.embed = body.embed_tokens
        self.layers = body.layers
        self.norm = body.norm
        self.lm_head = model.get_output_embeddings()
        rotary = body.rotary_emb
        self.register_buffer("inv_freq", rotary.inv_freq.detach().float().clone(), persistent=False)
        self.rope_scale = float(getattr(rotary, "attention_scaling", 1.0))
        self.scale = self.dims.head_dim**-0.5
        self.tied = self.dims.tied
        # Every weight the graphs multiply by, as a transposed *view* of the HF tensor (no copy): the
        # exporter stores it as the MatMul's B directly, instead of folding a Transpose into a second
        # copy of every weight (export memory stays near 2x the weights at any size).
        self.register_buffer("head_t", self._t(self.lm_head.weight))  # (H, vocab)
        self.head_blocks = [self.head_t]  # the head's column blocks (one until split_head)
        for i, layer in enumerate(self.layers):
            for name, lin in self._linears(layer).items():
                self.register_buffer(f"w{i}_{name}", self._t(lin.weight))

    def _t(self, weight, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """``weight[rows].T`` of an HF weight: a view (no copy), or a stand-in when streaming."""
        if self.weights is not None:
            return self.weights.derived(weight, rows)
        w = weight.detach()
        return (w if rows is None else w[rows[0] : rows[1]]).t()

    def _rows(self, weight, ids) -> torch.Tensor:
        """Real rows ``ids`` of an HF weight, (len(ids), H)."""
        if self.weights is not None:
            return self.weights.rows(weight, ids)
        return weight.detach()[torch.tensor(list(ids), dtype=torch.long)]

    def layer_weights(self, i: int):
        """Context in which layer ``i`` computes with its real weights (always, unless streaming)."""
        if self.weights is None:
            return contextlib.nullcontext()
        return self.weights.real_layer(self.layers[i], {(self, f"w{i}_{n}"): getattr(self, f"w{i}_{n}")
                                                        for n in self._linears(self.layers[i])})

    @staticmethod
    def _linears(layer) -> dict:
        attn, mlp = layer.self_attn, layer.mlp
        out = {n: getattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        if all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):  # SwiGLU (Qwen2/3, Llama)
            out.update({n: getattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")})
        return out

    def linear(self, i: int, name: str, x: torch.Tensor) -> torch.Tensor:
        """``x @ W^T (+ b)`` of layer ``i``'s projection ``name``."""
        layer = self.layers[i]
        lin = getattr(layer.self_attn, name, None) or getattr(layer.mlp, name)
        y = x @ getattr(self, f"w{i}_{name}")
        return y if lin.bias is None else y + lin.bias

    def mlp(self, i: int, x: torch.Tensor) -> torch.Tensor:
        mlp = self.layers[i].mlp
        if not hasattr(self, f"w{i}_down_proj"):
            return mlp(x)
        return self.linear(i, "down_proj", mlp.act_fn(self.linear(i, "gate_proj", x)) * self.linear(i, "up_proj", x))

    def split_head(self, columns: int = HEAD_BLOCK) -> None:
        """Multiply by the head in blocks of ``columns`` vocabulary columns, each a view of the HF weight
        stored as its own tensor. Only when the graphs don't also embed through ``head_t`` (tied cot)."""
        self.head_blocks = []
        for j, start in enumerate(range(0, self.dims.vocab, columns)):
            self.register_buffer(f"head_t{j}", self._t(self.lm_head.weight, (start, start + columns)))  # (H, <= columns)
            self.head_blocks.append(getattr(self, f"head_t{j}"))

    def restrict_embedding(self, token_ids) -> None:
        """Graphs will only embed ``token_ids`` (SID tokens, separators, the think suffix): store those
        rows alone (n x H) and a vocab -> row map, instead of the whole vocab x H table."""
        rows = sorted({int(t) for t in token_ids})
        row_of = torch.zeros(self.dims.vocab, dtype=torch.long)  # other ids read row 0 (never fed)
        row_of[torch.tensor(rows)] = torch.arange(len(rows))
        self.register_buffer("embed_row_of", row_of)
        self.register_buffer("embed_rows", self._rows(self.embed.weight, rows).clone())

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (...) -> embeddings (..., H)."""
        if hasattr(self, "embed_rows"):
            return self.embed_rows[self.embed_row_of[ids]]
        if not self.tied:
            return self.embed(ids)
        cols = self.head_t.index_select(1, ids.reshape(-1))  # (H, N): the head's own W^T, one copy
        return cols.t().reshape(*ids.shape, self.dims.hidden)

    def head_rows_t(self, token_ids: list[int]) -> torch.Tensor:
        """(H, n) transposed head rows of ``token_ids``: the SID-level head of one codebook."""
        return self._rows(self.lm_head.weight, token_ids).t().contiguous()

    def rope(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions (...,) int64 -> cos, sin (..., D) in the model dtype."""
        freqs = pos.unsqueeze(-1).float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        dtype = self.embed.weight.dtype
        return (emb.cos() * self.rope_scale).to(dtype), (emb.sin() * self.rope_scale).to(dtype)

    def qkv(self, i: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lead: tuple):
        """Normed hidden (*lead, H) -> q (*lead, Hq, D), k, v (*lead, Hkv, D) with RoPE applied to q and k.
        ``lead``: x's leading sizes, read once per graph by the caller (see ``_joint_attention``)."""
        attn = self.layers[i].self_attn
        d = self.dims
        q = self.linear(i, "q_proj", x).view(*lead, d.q_heads, d.head_dim)
        k = self.linear(i, "k_proj", x).view(*lead, d.kv_heads, d.head_dim)
        v = self.linear(i, "v_proj", x).view(*lead, d.kv_heads, d.head_dim)
        if hasattr(attn, "q_norm"):  # Qwen3
            q, k = attn.q_norm(q), attn.k_norm(k)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
        half = d.head_dim // 2
        return q * cos + _rotate_half(q, half) * sin, k * cos + _rotate_half(k, half) * sin, v

    def finish_layer(self, i: int, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Residual + o_proj, then the MLP block. attn_out (..., Hq * D)."""
        layer = self.layers[i]
        h = h + self.linear(i, "o_proj", attn_out)
        return h + self.mlp(i, layer.post_attention_layernorm(h))

    def logprobs(self, h: torch.Tensor) -> torch.Tensor:
        """Last hidden (..., H) -> full-vocabulary log-probs (..., vocab), float32."""
        x = self.norm(h)
        return torch.log_softmax(torch.cat([(x @ w).float() for w in self.head_blocks], dim=-1), dim=-1)

    def level_logprobs(self, h: torch.Tensor, rows_t: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """``full`` rule for one SID level: hidden (..., H) x codebook rows (H, V) -> those codes'
        log-probs under the whole vocabulary (``log_softmax`` over all tokens, read at the codes)."""
        x = self.norm(h)
        blocks = torch.stack([torch.logsumexp((x @ w).float(), dim=-1) for w in self.head_blocks], dim=-1)
        lp = (x @ rows_t).float() - torch.logsumexp(blocks, dim=-1, keepdim=True)  # (..., V)
        return lp if valid is None else lp.masked_fill(~valid, float("-inf"))

    def sid_logprobs(self, h: torch.Tensor, rows_t: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """``sid`` rule: hidden (..., H) x codebook rows (H, V) -> log-probs normalised over the valid codes."""
        logits = (self.norm(h) @ rows_t).float()  # (..., V)
        if valid is not None:
            logits = logits.masked_fill(~valid, float("-inf"))
        return torch.log_softmax(logits, dim=-1)


@torch.no_grad()
def prefix_kv(core: Core, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """KV of the constant instruction prefix, computed once at export: (layers, Hkv, P, D) each."""
    d = core.dims
    if not ids:
        empty = torch.zeros(d.layers, d.kv_heads, 0, d.head_dim, dtype=core.embed.weight.dtype)
        return empty, empty.clone()
    n = len(ids)
    cos, sin = core.rope(torch.arange(n))
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    h = core._rows(core.embed.weight, ids)  # (P, H)
    keys, values = [], []
    for i in range(d.layers):
        with core.layer_weights(i):  # (streaming: this layer's weights are read for the step, then dropped)
            q, k, v = core.qkv(i, core.layers[i].input_layernorm(h), cos, sin, (n,))  # (P, Hq|Hkv, D)
            q = q.transpose(0, 1).unflatten(0, (d.kv_heads, d.group))  # (Hkv, G, P, D)
            k, v = k.transpose(0, 1), v.transpose(0, 1)  # (Hkv, P, D)
            s = (q @ k.unsqueeze(1).transpose(-1, -2)) * core.scale  # (Hkv, G, P, P)
            p = torch.softmax(s.masked_fill(~causal, NEG).float(), dim=-1).to(v.dtype)
            out = (p @ v.unsqueeze(1)).permute(2, 0, 1, 3).reshape(n, -1)  # (P, Hq*D)
            h = core.finish_layer(i, h, out)
        keys.append(k)
        values.append(v)
    return torch.stack(keys), torch.stack(values)


class _Graph(nn.Module):
    """Shared constant: the prefix KV (layers, Hkv, P, D), computed at export time."""

    def __init__(self, core: Core, instruction_ids) -> None:
        super().__init__()
        self.core = core
        pk, pv = prefix_kv(core, list(instruction_ids))
        self.register_buffer(COMPUTED_CONSTANTS[0], pk)  # prefix_key (layers, Hkv, P, D)
        self.register_buffer(COMPUTED_CONSTANTS[1], pv)  # prefix_value
        self.prefix_len = pk.shape[2]

    def prefix_part(self, i: int, q: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, None]]:
        """q (B, Hkv, M, D), already scaled -> [(scores (B, Hkv, M, P), values (Hkv, P, D), None)] (a part of
        ``_joint_attention`` in its output's layout); none without prefix."""
        if self.prefix_len == 0:
            return []
        return [(q @ self.prefix_key[i].transpose(-1, -2), self.prefix_value[i], None)]


class PrefillGraph(_Graph):
    """(history_ids (B,T), history_mask (B,T)) -> (logprobs (B,V1|vocab), ctx_key, ctx_value (layers,B,Hkv,T+S,D))."""

    def __init__(self, core: Core, instruction_ids, suffix_ids, first_ids: list[int] | None,
                 scoring: str = "full", fuse_prefix: bool = True) -> None:
        super().__init__(core, instruction_ids)
        self.register_buffer("think_suffix_ids", torch.tensor(list(suffix_ids), dtype=torch.long))
        # fuse_prefix=False (an ablation): every row runs the instruction tokens through the layers again,
        # as a plain prompt prefill does; the outputs are the same, the prefix KV just leaves the graph.
        self.recompute_prefix = not fuse_prefix and self.prefix_len > 0
        if self.recompute_prefix:
            self.register_buffer("prefix_ids", torch.tensor(list(instruction_ids), dtype=torch.long))
        self.full_vocab = first_ids is None  # cot: the next token is a rationale token
        self.sid_head = scoring == "sid" and first_ids is not None
        if first_ids is not None:
            self.register_buffer("first_head_t", core.head_rows_t(list(first_ids)))  # (H, V1)

    def forward(self, history_ids: torch.Tensor, history_mask: torch.Tensor):
        d, core = self.core.dims, self.core
        b = history_ids.shape[0]
        t = history_ids.shape[1]
        s = self.think_suffix_ids.shape[0]
        lens = history_mask.sum(dim=1, keepdim=True)  # (B, 1)
        ids = torch.cat([history_ids, self.think_suffix_ids.unsqueeze(0).expand(b, s)], dim=1)  # (B, C)
        hist_pos = torch.arange(t).unsqueeze(0).expand(b, t)
        suf_pos = lens + torch.arange(s).unsqueeze(0)  # (B, S)
        pos = torch.cat([hist_pos, suf_pos], dim=1) + self.prefix_len  # (B, C)
        valid = torch.cat([history_mask > 0, torch.ones_like(suf_pos, dtype=torch.bool)], dim=1)  # (B, C)
        skip = 0  # leading slots computed here but not part of the context KV (the recomputed prefix)
        if self.recompute_prefix:  # (B, P + C): the instruction tokens at positions 0..P-1 of every row
            skip = self.prefix_len
            ids = torch.cat([self.prefix_ids.unsqueeze(0).expand(b, skip), ids], dim=1)
            pos = torch.cat([torch.arange(skip).unsqueeze(0).expand(b, skip), pos], dim=1)
            valid = torch.cat([torch.ones(b, skip, dtype=torch.bool), valid], dim=1)
        fused = self.prefix_len > 0 and not self.recompute_prefix
        visible = valid.unsqueeze(1) & (pos.unsqueeze(1) <= pos.unsqueeze(2))  # (B, Cq, Ck)
        dtype = core.embed.weight.dtype
        bias = torch.where(visible, 0.0, NEG).to(dtype)  # (B, Cq, Ck)
        if fused:
            bias = torch.cat([torch.zeros_like(bias[:, :, :1]).expand(b, ids.shape[1], self.prefix_len), bias], dim=2)
        bias = bias.unsqueeze(1).unsqueeze(1)  # (B, 1, 1, Cq, P+Ck): every query sees the whole prefix
        cos, sin = core.rope(pos)
        h = core.embed_ids(ids)  # (B, C, H)
        c = h.shape[1]
        keys, values = [], []
        for i in range(d.layers):
            q, k, v = core.qkv(i, core.layers[i].input_layernorm(h), cos, sin, (b, c))  # (B, C, H*, D)
            q = q.transpose(1, 2).reshape(b, d.kv_heads, d.group * c, d.head_dim) * core.scale  # (B,Hkv,G*C,D)
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, Hkv, C, D)
            keys.append(k[:, :, skip:])
            values.append(v[:, :, skip:])
            if fused:  # (B, Hkv, P+C, D): one small copy of the prefix, one softmax
                k = torch.cat([self.prefix_key[i].unsqueeze(0).expand(b, -1, -1, -1), k], dim=2)
                v = torch.cat([self.prefix_value[i].unsqueeze(0).expand(b, -1, -1, -1), v], dim=2)
            n_keys = c + (self.prefix_len if fused else 0)  # k's keys (explicit sizes, no -1 and no k.shape)
            scores = (q @ k.transpose(-1, -2)).view(b, d.kv_heads, d.group, c, n_keys) + bias  # (B,Hkv,G,C,P+C)
            probs = torch.softmax(scores.float(), dim=-1).to(v.dtype).view(b, d.kv_heads, d.group * c, n_keys)
            out = (probs @ v).view(b, d.q_heads, c, d.head_dim).transpose(1, 2).reshape(b, c, d.q_heads * d.head_dim)
            h = core.finish_layer(i, h, out)
        last = h[:, -1]  # (B, H): the last suffix token ends every row
        if self.full_vocab:  # (B, vocab): cot's first rationale token
            lp = core.logprobs(last)
        elif self.sid_head:  # (B, V1): only level 1's rows of the head
            lp = core.sid_logprobs(last, self.first_head_t)
        else:  # (B, V1) under the whole vocabulary
            lp = core.level_logprobs(last, self.first_head_t)
        return lp, torch.stack(keys), torch.stack(values)


class DecodeGraph(_Graph):
    """One SID level for all beams of all users.

    ``sid_token_ids`` are the token tables of the levels the graph steps through: the SID levels, then (when
    the pipeline scores what follows the SID) one table of one token per token after the SID, so a step past
    the SID returns that token's log-prob as the only "code" of its level.

    Inputs: codes (B,K) level-local codes chosen at level ``step``; step () int64; ctx_key/ctx_value
    (layers,B,Hkv,C,D) shared by the K beams; ctx_mask (B,C); beam_key/beam_value (layers,B,Hkv,K,S,D), S the
    steps (L-1 + the tokens after the SID): slot j holds the beam's level-j token (slots >= step are ignored).
    Outputs: logprobs (B,K,Vnext) over level step+1's codes (-inf beyond its codebook); new_key/new_value
    (layers,B,Hkv,K,1,D): the beams' KV of slot ``step``, which the caller writes into its beam KV.
    """

    def __init__(self, core: Core, instruction_ids, sid_token_ids: list[list[int]], scoring: str = "full") -> None:
        super().__init__(core, instruction_ids)
        levels = len(sid_token_ids)
        self.slots = levels - 1
        v_in = max(len(x) for x in sid_token_ids[:-1])
        v_out = max(len(x) for x in sid_token_ids[1:])
        tin = torch.zeros(levels - 1, v_in, dtype=torch.long)
        tout = torch.zeros(levels - 1, v_out, dtype=torch.long)
        vout = torch.zeros(levels - 1, v_out, dtype=torch.bool)
        for lvl in range(levels - 1):
            tin[lvl, : len(sid_token_ids[lvl])] = torch.tensor(sid_token_ids[lvl])
            tout[lvl, : len(sid_token_ids[lvl + 1])] = torch.tensor(sid_token_ids[lvl + 1])
            vout[lvl, : len(sid_token_ids[lvl + 1])] = True
        self.register_buffer("sid_in_table", tin)  # (L-1, Vin): code at level l -> token id
        self.register_buffer("sid_out_valid", vout)
        self.sid_head = scoring == "sid"
        # (L-1, H, Vout): level l+1's head rows (padding columns repeat a real row, masked)
        heads = [core.head_rows_t([int(t) for t in tout[lvl]]) for lvl in range(levels - 1)]
        self.register_buffer("sid_head_t", torch.stack(heads))

    def forward(self, codes, step, ctx_key, ctx_value, ctx_mask, beam_key, beam_value):
        d, core = self.core.dims, self.core
        b, k_beams = codes.shape[0], codes.shape[1]
        dtype = core.embed.weight.dtype
        tokens = self.sid_in_table[step].index_select(0, codes.reshape(-1)).view(b, k_beams)  # (B, K)
        pos = (ctx_mask.sum(dim=1, keepdim=True) + step + self.prefix_len).expand(b, k_beams)  # (B, K)
        slot = torch.arange(self.slots)
        write = (slot == step).view(1, 1, -1, 1)  # (1, 1, L-1, 1)
        own_bias = torch.where(slot <= step, 0.0, NEG).to(dtype).view(1, 1, 1, 1, -1)  # (1, 1, 1, 1, L-1)
        ctx_bias = torch.where(ctx_mask > 0, 0.0, NEG).to(dtype).view(b, 1, 1, ctx_mask.shape[1])  # (B, 1, 1, C)
        cos, sin = core.rope(pos)
        h = core.embed_ids(tokens)  # (B, K, H)
        shape = (b, d.kv_heads, k_beams * d.group, d.head_dim)
        new_keys, new_values = [], []
        for i in range(d.layers):
            q, k, v = core.qkv(i, core.layers[i].input_layernorm(h), cos, sin, (b, k_beams))  # (B, K, H*, D)
            q5 = q.view(b, k_beams, d.kv_heads, d.group, d.head_dim).permute(0, 2, 1, 3, 4) * core.scale  # (B,Hkv,K,G,D)
            qc = q5.reshape(shape)  # (B, Hkv, K*G, D): all beams of a user against one shared context
            nk, nv = k.transpose(1, 2).unsqueeze(3), v.transpose(1, 2).unsqueeze(3)  # (B, Hkv, K, 1, D)
            bk = torch.where(write, nk, beam_key[i])  # (B, Hkv, K, L-1, D)
            bv = torch.where(write, nv, beam_value[i])
            ctx = (qc @ ctx_key[i].transpose(-1, -2)) + ctx_bias  # (B, Hkv, K*G, C)
            own = (q5 @ bk.transpose(-1, -2)) + own_bias  # (B, Hkv, K, G, L-1): each beam's own positions
            own_rows = (b, d.kv_heads, k_beams, d.group)
            out = _joint_attention(self.prefix_part(i, qc) + [(ctx, ctx_value[i], None), (own, bv, own_rows)], shape)
            out = out.view(b, d.kv_heads, k_beams, d.group, d.head_dim).permute(0, 2, 1, 3, 4).reshape(
                b, k_beams, d.q_heads * d.head_dim)
            h = core.finish_layer(i, h, out)  # (B, K, H)
            new_keys.append(nk)  # only this step's slot leaves the graph; the runtime writes it in place
            new_values.append(nv)
        rule = core.sid_logprobs if self.sid_head else core.level_logprobs  # (B, K, Vout)
        lp = rule(h, self.sid_head_t[step], self.sid_out_valid[step])
        return lp, torch.stack(new_keys), torch.stack(new_values)


class ThinkGraph(_Graph):
    """cot: (token (B,), ctx_key, ctx_value (layers,B,Hkv,C,D), ctx_mask (B,C)) -> full-vocab logprobs (B,vocab)
    + the token's KV (layers,B,Hkv,1,D). The caller writes the KV into a free context slot and marks it valid."""

    def forward(self, token, ctx_key, ctx_value, ctx_mask):
        d, core = self.core.dims, self.core
        b = token.shape[0]
        pos = ctx_mask.sum(dim=1, keepdim=True) + self.prefix_len  # (B, 1)
        ctx_bias = torch.where(ctx_mask > 0, 0.0, NEG).to(core.embed.weight.dtype).view(b, 1, 1, ctx_mask.shape[1])
        cos, sin = core.rope(pos)
        h = core.embed_ids(token.view(b, 1))  # (B, 1, H)
        shape = (b, d.kv_heads, d.group, d.head_dim)
        new_keys, new_values = [], []
        for i in range(d.layers):
            q, k, v = core.qkv(i, core.layers[i].input_layernorm(h), cos, sin, (b, 1))  # (B, 1, H*, D)
            qc = q.view(shape) * core.scale  # (B, Hkv, G, D)
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, Hkv, 1, D)
            ctx = (qc @ ctx_key[i].transpose(-1, -2)) + ctx_bias  # (B, Hkv, G, C)
            parts = self.prefix_part(i, qc) + [(ctx, ctx_value[i], None), (qc @ k.transpose(-1, -2), v, None)]
            h = core.finish_layer(i, h, _joint_attention(parts, shape).reshape(b, 1, d.q_heads * d.head_dim))
            new_keys.append(k)
            new_values.append(v)
        return core.logprobs(h[:, 0]), torch.stack(new_keys), torch.stack(new_values)
