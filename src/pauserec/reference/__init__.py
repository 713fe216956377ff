"""References the engine is checked and measured against (need torch and transformers, the ``train`` extra).

* ``hf_generate``: Hugging Face ``generate(num_beams=K, prefix_allowed_tokens_fn=trie)`` on the checkpoint,
  the way pipelines run it: export's exactness check and ``pauserec-bench``'s baseline.
"""
