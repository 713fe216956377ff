"""The prompt: how a model reads a user's history, in one place (torch-free; ``hf`` needs transformers).

Training, export, the runtime, validation and every baseline read prompts through this package:

* ``layout``: ``PromptLayout``, the prompt as data (text or chat template, item rendering, separator,
  tokenisation rule, history budget, what the pipeline generates after the SID), its presets
  (pauserec, minionerec, lc-rec:N, onerec-think) and JSON files;
* ``spec``: ``PromptSpec``, the prompt at the token level (fused prefix and suffix ids, per-item ids or
  text assembly), ``PromptEncoder`` (histories -> ids, the one place that does it) and ``TrainingCard``;
* ``resolve``: a layout + a tokenizer + a catalog -> its ``PromptSpec``, read off probe prompts;
* ``hf``: the checkpoint's ``transformers`` tokenizer and chat template as the independent judge of the
  engine's prompts (rendering, reference ids, checks);
* ``source``: a checkpoint directory's tokenizers and prompt (its training card, or a declared layout).

    layout ──► resolve ──► spec ◄── runtime, train, export, bench
       └──► hf (transformers) ──► source (checkpoint dirs)
"""
