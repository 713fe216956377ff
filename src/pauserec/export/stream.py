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
written (the embedding or head, as float32), and the validation sequences' hidden states.
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
