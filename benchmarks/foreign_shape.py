"""A Qwen3-0.6B-shaped checkpoint built the way MiniOneRec builds its checkpoints, for checking a foreign export at
a real size: a byte-level BPE tokenizer (the tests' builder, tests/external_ckpts.py: Qwen pre-tokenizer regex),
the Scientific rkmeans_zcr index's 1,024 SID tokens added with ``add_tokens``, the real 151,936-row vocabulary
(the rows past the tokenizer are padding), tied head, seeded random weights.

    python benchmarks/foreign_shape.py CKPT          # from the repository root
    pauserec-export CKPT --out ENGINE --prompt minionerec --index DATA/indexes/rkmeans_zcr/Scientific.index.json
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from external_ckpts import make_checkpoint, sid_vocab  # noqa: E402


def main() -> None:
    import transformers

    from pauserec.bench.shapes import random_model, shape_config

    out = Path(sys.argv[1])
    make_checkpoint(out, arch="qwen3", sid_tokens=sid_vocab(("a", "b", "c", "d"), 256))  # tokenizer; tiny model
    tok = transformers.AutoTokenizer.from_pretrained(out)
    cfg = shape_config("qwen3-0.6b")
    cfg.update(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    model = random_model("qwen3", cfg, seed=0)
    for f in out.glob("model*.safetensors*"):
        f.unlink()
    model.save_pretrained(out)
    print(f"{out}: {len(tok):,} tokens, vocabulary {cfg['vocab_size']:,}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters")


if __name__ == "__main__":
    main()
