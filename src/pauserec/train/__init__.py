"""Training of direct, PauseRec (pause) and CoT recommenders, and the PyTorch reference recommender.

Needs the ``train`` extra (torch, transformers); nothing here is imported by ``pauserec.runtime``.

* ``pauserec.train.sft``: ``train(TrainConfig(...)) -> TrainResult`` (writes a checkpoint directory);
* ``pauserec.train.model``: presets, ``load_checkpoint(path) -> Checkpoint`` (model, tokenizer, card,
  catalog), ``save_checkpoint``;
* ``pauserec.train.reference``: ``ReferenceRecommender`` (exact trie-constrained beam search),
  ``exhaustive_scores``, ``evaluate`` / ``evaluate_checkpoint``;
* ``pauserec.train.tokenizer`` and ``pauserec.train.rationale``: BPE tokenizer + special tokens (and the
  HF tokenizer files of a checkpoint), and the cot rationale template. ``model`` imports ``tokenizer``,
  never the reverse.

Submodules import torch lazily, so ``import pauserec.train`` itself is cheap.
"""

KINDS = ("direct", "pause", "cot")

__all__ = ["KINDS"]
