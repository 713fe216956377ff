"""Checkpoints trained elsewhere (MiniOneRec, LC-Rec, OneRec-Think formats, custom layouts) export token for token.

Each test builds a tiny checkpoint of a pipeline's format (byte-level BPE tokenizer with SID tokens added after
training, as the pipelines do), exports it with a prompt preset or file, and then checks the engine against a
reference this file builds on its own: the pipeline's prompt text written out here, tokenised with the
checkpoint's HF tokenizer the way the pipeline calls it, ranked with HF ``generate`` + a trie of the index's SIDs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from external_ckpts import QWEN3_CHAT_TEMPLATE, make_checkpoint, sid_vocab, write_index, write_items  # noqa: E402

from pauserec.errors import CheckpointError, DataError, ExportError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_ITEMS, CODES = 36, 6
MINI_INSTRUCTION = ("Below is an instruction that describes a task, paired with an input that provides further "
                    "context. Write a response that appropriately completes the request. \n\n### Instruction:\n"
                    "Can you predict the next possible item that the user may expect?\n\n")
LCREC_0 = ("Below is an instruction that describes a task. Write a response that appropriately completes the request."
           "\n\n### Instruction:\nThe user has interacted with items {inters} in chronological order. Can you predict "
           "the next possible item that the user may expect?\n\n### Response:")
ONEREC_SYSTEM = ("You are a professional recommendation expert who needs to recommend the next possible purchase for "
                 "users based on their purchase history. Please predict the most likely next product that the user "
                 "will purchase based on the user's historical purchase information.")


def _setup(root: Path, name: str, prefixes, arch: str, sid_style: str = "{}", extra=(), **ckpt):
    """A checkpoint dir + its index (+ items file) under ``root``; SID tokens spelt ``sid_style`` of '<a_1>'."""
    ckpt_dir = root / name
    index = write_index(root / f"{name}.index.json", N_ITEMS, prefixes, CODES, seed=1)
    items = write_items(root / f"{name}.item.json", index)
    make_checkpoint(ckpt_dir, arch=arch, sid_tokens=sid_vocab(prefixes, CODES), extra_tokens=extra, **ckpt)
    return ckpt_dir, index, items


def _export(tmp_path, ckpt, index_name, **cfg):
    from pauserec.export import ExportConfig, export_engine

    out = tmp_path / f"engine-{ckpt.name}-{len(list(tmp_path.iterdir()))}"
    return export_engine(ExportConfig(checkpoint=ckpt, out=out, index=ckpt.parent / index_name, **cfg))


def _histories(n_users: int, seed: int = 3, most: int = 6) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    return [[str(i) for i in rng.integers(0, N_ITEMS, size=int(rng.integers(1, most + 1)))] for _ in range(n_users)]


def hf_top10(ckpt: Path, prompts: list[list[int]], index: dict, beams: int = 12, after: str = "",
             eos: bool = False) -> list[list[tuple[str, float]]]:
    """HF ``generate`` + a trie of the index's SID tokens, on prompts this file built; collision groups expanded
    in index order. Independent of pauserec's own baseline code. ``after``/``eos``: the pipeline's target goes on
    after the SID (MiniOneRec: the SID's text + "\n" tokenised together, then EOS; LC-Rec: EOS), forced and scored,
    and EOS ends the beams, as the pipelines' own evaluation scripts run ``generate``."""
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    groups: dict[tuple, list[str]] = {}
    paths: dict[tuple, list[int]] = {}
    for item, sid in index.items():
        ids = tuple(tok.convert_tokens_to_ids(sid))
        groups.setdefault(ids, []).append(item)
        paths[ids] = tok("".join(sid) + after, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if eos else [])
    trie: dict = {}
    for seq in groups:
        node = trie
        for t in paths[seq]:
            node = node.setdefault(t, {})
    levels = len(next(iter(groups)))
    steps = len(next(iter(paths.values())))
    out = []
    for prompt in prompts:
        ids = torch.tensor([prompt])

        def allowed(_b, input_ids, start=len(prompt)):
            node = trie
            for t in input_ids[start:].tolist():
                node = node.get(t, {})
            return list(node)

        with torch.no_grad():
            res = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), num_beams=beams,
                                 num_return_sequences=beams, max_new_tokens=steps, do_sample=False, length_penalty=0.0,
                                 prefix_allowed_tokens_fn=allowed, output_scores=True, return_dict_in_generate=True,
                                 pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                                 eos_token_id=tok.eos_token_id if eos else None)
        ranked = []
        for seq, score in zip(res.sequences[:, len(prompt):].tolist(), res.sequences_scores.tolist()):
            ranked += [(item, score) for item in groups.get(tuple(seq[:levels]), [])]
        out.append(ranked[:10])
    return out


def assert_same_top10(engine_dir: Path, histories: list[list[str]], want: list[list[tuple[str, float]]]) -> None:
    from pauserec.runtime import Engine, Recommender

    got = Recommender(Engine.load(engine_dir, provider="cpu")).recommend(histories, k=10, beams=12)
    for u, ref in enumerate(want):
        items = [str(x) for x in got.items[u] if x != ""]
        scores = got.scores[u][: len(items)]
        assert np.allclose(scores, [s for _, s in ref], atol=1e-3), (u, items, ref)
        for j, (item, score) in enumerate(ref):  # the same items, up to the order of exact ties
            tied = {i for i, s in ref if abs(s - score) < 1e-3}
            assert items[j] == item or items[j] in tied, (u, j, items, ref)


def encoder_prompts(engine_dir: Path, histories) -> list[list[int]]:
    from pauserec.runtime import Engine

    e = Engine.load(engine_dir, provider="cpu")
    return [e.encoder.full(np.array([e.catalog.index_of(x) for x in h[-e.max_history:]])).tolist() for h in histories]


# -- MiniOneRec: Qwen2 (q/k/v biases), tied, plain added SID tokens, two segments tokenised separately --------
def test_minionerec_checkpoint_exports_token_for_token(tmp_path):
    ckpt, index, _ = _setup(tmp_path, "mini", ("a", "b", "c"), "qwen2", tied=True)
    report = _export(tmp_path, ckpt, "mini.index.json", prompt="minionerec", check_users=4)
    m = report.manifest
    assert m["prompt"]["layout"] == "minionerec" and m["prompt"]["assembly"] == "ids"
    assert report.prompt["identical"] == report.prompt["users"] > 0 and report.prompt["hf_generate"]["identical_top10"]
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)

    def mini_prompt(history: list[str]) -> list[int]:  # EvalSidDataset.pre: two encodes, BOS only if one exists
        sids = ["".join(index[i]) for i in history[-10:]]
        user = ("### User Input: \nCan you predict the next possible item the user may expect, given the following "
                "chronological interaction history: " + ", ".join(sids) + "\n\n### Response:\n")
        ids = []
        for text, bos in ((MINI_INSTRUCTION, True), (user, False)):
            t = tok.encode(text)
            t = t[1:] if tok.bos_token_id is not None and t[:1] == [tok.bos_token_id] else t
            ids += ([tok.bos_token_id] if bos and tok.bos_token_id is not None else []) + t
        return ids

    histories = _histories(6)
    prompts = [mini_prompt(h) for h in histories]
    assert encoder_prompts(report.out, histories) == prompts
    assert_same_top10(report.out, histories, hf_top10(ckpt, prompts, index, after="\n", eos=True))


# -- LC-Rec: Llama (BOS from the post-processor, llama3 RoPE), untied, 4 levels, whole string -----------------
@pytest.mark.parametrize("template", [0, 7])
def test_lcrec_checkpoint_exports_token_for_token(tmp_path, template):
    from pauserec.prompt.layout import LCREC_SEQREC

    ckpt, index, _ = _setup(tmp_path, "lcrec", ("a", "b", "c", "d"), "llama", tied=False)
    report = _export(tmp_path, ckpt, "lcrec.index.json", prompt=f"lc-rec:{template}", check_users=3)
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    instruction = LCREC_0 if template == 0 else LCREC_0.replace(
        "The user has interacted with items {inters} in chronological order. Can you predict the next possible item "
        "that the user may expect?", LCREC_SEQREC[7])
    histories = _histories(5)
    prompts = [tok(instruction.replace("{inters}", ", ".join("".join(index[i]) for i in h[-20:])))["input_ids"]
               for h in histories]
    assert all(p[0] == tok.bos_token_id for p in prompts)
    assert encoder_prompts(report.out, histories) == prompts
    assert report.manifest["shapes"]["prefix_len"] > 1  # BOS + the instruction's start, fused
    assert_same_top10(report.out, histories, hf_top10(ckpt, prompts, index, eos=True))


# -- OneRec-Think: Qwen3, special SID tokens with begin/end, vocabulary padded beyond the tokenizer -------------
def _onerec_prompt(tok, index, history, assistant: str) -> list[int]:
    sids = ["<|sid_begin|>" + "".join(index[i]) + "<|sid_end|>" for i in history[-20:]]
    user = "The user has purchased the following items: " + "; ".join(sids) + ";"
    text = (f"<|im_start|>system\n{ONEREC_SYSTEM}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
            f"<|im_start|>assistant\n{assistant}<|sid_begin|>")  # the decoder's forced first token
    return tok(text)["input_ids"]


@pytest.mark.parametrize("kind", ["direct", "pause"])
def test_onerec_think_checkpoint_exports_token_for_token(tmp_path, kind):
    extra = ("<|sid_begin|>", "<|sid_end|>", "<|thought|>")
    ckpt, index, _ = _setup(tmp_path, "onerec", ("s_a", "s_b", "s_c"), "qwen3", extra=extra, sid_as_special=True,
                            pad_vocab_multiple=64, tied=True)
    cfg = json.loads((ckpt / "config.json").read_text())
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    assert cfg["vocab_size"] > len(tok)
    report = _export(tmp_path, ckpt, "onerec.index.json", prompt="onerec-think", kind=kind,
                     pause_k=5 if kind == "pause" else None, check_users=3)
    assert report.manifest["prompt"]["assembly"] == "ids" and report.manifest["prompt"]["sep_ids"]
    assistant = "<think>\n\n</think>\n" if kind == "direct" else "<|thought|>" * 5 + "\n"
    histories = _histories(5)
    prompts = [_onerec_prompt(tok, index, h, assistant) for h in histories]
    assert encoder_prompts(report.out, histories) == prompts
    assert_same_top10(report.out, histories, hf_top10(ckpt, prompts, index, after="<|sid_end|>", eos=True))


def test_onerec_think_cot_checkpoint_reasons_then_ranks_as_its_pipeline(tmp_path):
    """OneRec-Think's explicit-CoT format: the assistant turn opens <think>, the model writes its rationale (greedy)
    up to </think>, then "\n<|sid_begin|>" is forced and the SID decoded under the trie (then <|sid_end|>, EOS)."""
    extra = ("<|sid_begin|>", "<|sid_end|>", "<|thought|>")
    ckpt, index, _ = _setup(tmp_path, "onecot", ("s_a", "s_b", "s_c"), "qwen3", extra=extra, sid_as_special=True,
                            tied=True)
    report = _export(tmp_path, ckpt, "onecot.index.json", prompt="onerec-think", kind="cot", max_rationale=6,
                     check_users=3)
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    end = tok("</think>\n<|sid_begin|>", add_special_tokens=False)["input_ids"]
    spec = report.manifest["prompt"]
    assert [spec["think_end_id"], *spec["after_think_ids"]] == end
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    histories = _histories(4)
    prompts = []
    for h in histories:  # the pipeline's two stages: a greedy thought, then the SID after </think>\n<|sid_begin|>
        head = _onerec_prompt(tok, index, h, "<think>\n")[:-1]  # (no <|sid_begin|>: the rationale comes first)
        ids = torch.tensor([head])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
                                 eos_token_id=end[0], pad_token_id=tok.pad_token_id or tok.eos_token_id)
        thought = out[0, len(head):].tolist()
        thought = thought[: thought.index(end[0])] if end[0] in thought else thought
        prompts.append(head + thought + end)
    assert report.prompt["hf_generate"]["identical_top10"]  # export's own check (pauserec's HF reference)
    assert_same_top10(report.out, histories, hf_top10(ckpt, prompts, index, after="<|sid_end|>", eos=True))


# -- custom files: titles beside SIDs (text assembly), a chat template with a pinned system prompt -------------
def test_custom_layout_with_titles_assembles_from_text(tmp_path):
    ckpt, index, items = _setup(tmp_path, "titles", ("a", "b", "c"), "qwen3", tied=False)
    layout = {"name": "titled", "template": "Items the user bought: {history}.\nNext item:", "item": '"{title}" {sid}',
              "separator": ", ", "max_history": 5}
    (tmp_path / "titled.json").write_text(json.dumps(layout))
    report = _export(tmp_path, ckpt, "titles.index.json", prompt=str(tmp_path / "titled.json"),
                     items=tmp_path / "titles.item.json", check_users=3)
    spec = report.manifest["prompt"]
    assert spec["assembly"] == "text" and spec["fields"] == ["title"]
    assert {"tokenizer.json", "items.json"} <= set(report.files)
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    histories = _histories(6, most=8)
    texts = ["Items the user bought: " + ", ".join(f'"{items[i]["title"]}" ' + "".join(index[i]) for i in h[-5:]) +
             ".\nNext item:" for h in histories]
    prompts = [tok(t)["input_ids"] for t in texts]
    assert encoder_prompts(report.out, histories) == prompts
    # the fused prefix is found, not assumed: the text before {history} does not end on a token boundary here
    assert spec["prefix_ids"] != tok("Items the user bought: ")["input_ids"]
    assert_same_top10(report.out, histories, hf_top10(ckpt, prompts, index))

    # a catalog update brings new items: their titles come with --items, or the update is refused
    from pauserec.runtime import Engine, Recommender
    from pauserec.runtime.catalog_update import update_catalog

    grown = {**index, "new1": ["<a_0>", "<b_5>", "<c_2>"], "new2": ["<a_5>", "<b_0>", "<c_4>"]}
    (tmp_path / "grown.index.json").write_text(json.dumps(grown))
    with pytest.raises(DataError, match="'new1' has no title.*--items"):
        update_catalog(report.out, tmp_path / "grown.index.json")
    (tmp_path / "new.item.json").write_text(json.dumps({"new1": {"title": "Spectrometer, Mini"},
                                                        "new2": {"title": "Fume Hood Filter"}}))
    update_catalog(report.out, tmp_path / "grown.index.json", items=tmp_path / "new.item.json")
    engine = Engine.load(report.out)
    text = engine.encoder.text(np.array([engine.catalog.index_of("new1"), engine.catalog.index_of("0")]))
    assert text[0].startswith('Items the user bought: "Spectrometer, Mini" <a_0><b_5><c_2>, "')
    out = Recommender(engine).recommend([["new1", "new2"]], k=5, beams=8)
    assert (out.item_index >= 0).all()


def test_segments_are_tokenised_apart_when_declared(tmp_path):
    """A boundary inside a merge: "…next?" | "\n\n### Response:\n" tokenised apart differs from the whole string."""
    ckpt, index, _ = _setup(tmp_path, "seg", ("a", "b", "c"), "qwen3")
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    head, tail = "History: {history} What comes next?", "\n\n### Response:\n"
    suffixes, histories = {}, _histories(4)
    for mode, template in (("segments", [head, tail]), ("whole", head + tail)):
        path = tmp_path / f"{mode}.json"
        path.write_text(json.dumps({"name": mode, "template": template, "tokenize": mode, "separator": ", ",
                                    "max_history": 4}))
        report = _export(tmp_path, ckpt, "seg.index.json", prompt=str(path), check_users=0)
        suffixes[mode] = report.manifest["prompt"]["suffix_ids"]
        texts = [head.replace("{history}", ", ".join("".join(index[i]) for i in h[-4:])) for h in histories]
        want = [tok(t)["input_ids"] + tok(tail)["input_ids"] if mode == "segments" else tok(t + tail)["input_ids"]
                for t in texts]
        assert encoder_prompts(report.out, histories) == want
    assert suffixes["segments"] != suffixes["whole"]


def test_chat_layout_renders_the_checkpoints_template(tmp_path):
    extra = ("<|sid_begin|>", "<|sid_end|>")
    ckpt, index, _ = _setup(tmp_path, "chat", ("s_a", "s_b", "s_c"), "qwen3", extra=extra,
                            chat_template=QWEN3_CHAT_TEMPLATE)
    layout = {"name": "openonerec-like", "chat": {"system": "You recommend products.",
                                                  "user": "History:\n{history}\nWhat next?",
                                                  "assistant": "<|sid_begin|>",
                                                  "template_kwargs": {"enable_thinking": False}},
              "item": "<|sid_begin|>{sid}<|sid_end|>", "max_history": 8}
    (tmp_path / "chat.json").write_text(json.dumps(layout))
    report = _export(tmp_path, ckpt, "chat.index.json", prompt=str(tmp_path / "chat.json"), check_users=3)
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    histories = _histories(4)
    prompts = []
    for h in histories:
        sids = "".join("<|sid_begin|>" + "".join(index[i]) + "<|sid_end|>" for i in h[-8:])
        msgs = [{"role": "system", "content": "You recommend products."},
                {"role": "user", "content": f"History:\n{sids}\nWhat next?"}]
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)
        assert text.endswith("<think>\n\n</think>\n\n")
        prompts.append(tok(text + "<|sid_begin|>", add_special_tokens=False)["input_ids"])
    assert encoder_prompts(report.out, histories) == prompts
    assert_same_top10(report.out, histories, hf_top10(ckpt, prompts, index))


def _sources(tmp_path, ckpt, index_name, layout: dict, **cfg):
    """The export's inputs (prompt resolved, chat template rendered and pinned), then its prompt checks; no graphs."""
    from pauserec.export import ExportConfig
    from pauserec.export.bundle import load_sources
    from pauserec.export.pipeline import check_prompts

    path = tmp_path / f"{layout.get('name', 'layout')}.json"
    path.write_text(json.dumps(layout))
    src = load_sources(ExportConfig(checkpoint=ckpt, out=tmp_path / "never", index=ckpt.parent / index_name,
                                    prompt=str(path), **cfg))
    return src, check_prompts(ExportConfig(checkpoint=ckpt, out=tmp_path / "never", prompt_sample=16), src)


def _chat_ids(tok, layout: dict, sids: str, **kwargs) -> list[int]:
    """apply_chat_template alone (tokenize=True) on one user's messages."""
    chat = layout["chat"]
    msgs = [{"role": "system", "content": chat["system"]}] if "system" in chat else []
    msgs.append({"role": "user", "content": chat["user"].replace("{history}", sids)})
    return list(tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, **kwargs)["input_ids"])


TRIM_TEMPLATE = (  # Llama / Qwen2.5 style: the message content trimmed
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_chat_reference_is_apply_chat_template_alone(tmp_path):
    """A template that trims the message: the engine (the template rendered once, {history} filled in later) is
    judged by apply_chat_template on each user's own messages; an item text that the trim cuts is refused, the
    difference shown, and a layout whose message survives the trim gives apply_chat_template's ids exactly."""
    ckpt, index, _ = _setup(tmp_path, "trim", ("a", "b", "c"), "qwen3", chat_template=TRIM_TEMPLATE)
    listed = {"name": "listed", "chat": {"system": "You recommend.", "user": "Items:\n{history}"},
              "item": "- {sid}\n", "max_history": 4}  # the last item's newline ends the message: trimmed away
    with pytest.raises(ExportError, match=r"(?s)\(the history\).*texts differ at character \d+: engine .*\\n<\|im_end"
                                          r".*trims or rewrites"):
        _sources(tmp_path, ckpt, "trim.index.json", listed)
    inline = {"name": "inline", "chat": {"system": "You recommend.", "user": "  Items: {history}\n"},
              "separator": ", ", "max_history": 4}  # the trim cuts only the layout's own spaces
    src, check = _sources(tmp_path, ckpt, "trim.index.json", inline)
    assert check["identical"] == 16 and check["item_texts_identical"] == N_ITEMS
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    for h in _histories(5):
        dense = np.array([src.catalog.index_of(i) for i in h[-4:]])
        want = _chat_ids(tok, inline, ", ".join("".join(index[i]) for i in h[-4:]))
        assert src.encoder.full(dense).tolist() == want


def _chat_head(system: str) -> str:
    return ("{{- '<|im_start|>system\\n' + " + system + " + '<|im_end|>\\n' }}"
            "{%- for message in messages %}"
            "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
            "{%- endfor %}"
            "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def test_chat_template_reading_the_date_is_refused_unless_pinned(tmp_path):
    """Templates that write the date (transformers' strftime_now clock, or a date_string variable with a default)
    change meaning after export: refused, naming what they read, unless the layout pins it; a pin is warned about."""
    import datetime

    from pauserec.export import ExportConfig, export_engine

    clock, _, _ = _setup(tmp_path, "clock", ("a", "b", "c"), "qwen3",
                         chat_template=_chat_head("'Today is ' + strftime_now('%Y-%m-%d') + '.'"))
    layout = {"name": "clock", "chat": {"user": "History: {history}"}, "separator": ", ", "max_history": 4}
    with pytest.raises(ExportError, match=r"renders differently with strftime_now.*'strftime_now': null"):
        _sources(tmp_path, clock, "clock.index.json", layout)
    with pytest.raises(DataError, match="strftime_now must be null"):
        _sources(tmp_path, clock, "clock.index.json", {**layout, "chat": {**layout["chat"],
                                                                           "pin": {"strftime_now": "2024-01-01"}}})
    pinned = {**layout, "chat": {**layout["chat"], "pin": {"strftime_now": None}}}
    (tmp_path / "pinned.json").write_text(json.dumps(pinned))
    said = []
    report = export_engine(ExportConfig(checkpoint=clock, out=tmp_path / "e-clock", index=tmp_path / "clock.index.json",
                                        prompt=str(tmp_path / "pinned.json"), check_users=0, prompt_sample=8),
                           progress=lambda stage, detail: said.append((stage, detail)))
    today = datetime.date.today().isoformat()
    warned = [d for stage, d in said if stage == "WARNING"]
    assert len(warned) == 1 and "strftime_now is pinned" in warned[0] and today in warned[0]
    assert report.prompt["warnings"] == warned
    tok = transformers.AutoTokenizer.from_pretrained(clock)
    assert f"Today is {today}." in tok.decode(encoder_prompts(report.out, [["0"]])[0])

    dated, index, _ = _setup(tmp_path, "dated", ("a", "b", "c"), "qwen3", chat_template=(
        "{%- if date_string is not defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
        + _chat_head("'Today Date: ' + date_string")))
    layout = {"name": "dated", "chat": {"user": "History: {history}"}, "separator": ", ", "max_history": 4}
    with pytest.raises(ExportError, match=r"renders differently with date_string \(besides the messages\)"):
        _sources(tmp_path, dated, "dated.index.json", layout)
    with pytest.raises(DataError, match="sets date_string, a date; move it to chat.pin"):
        _sources(tmp_path, dated, "dated.index.json",
                 {**layout, "chat": {**layout["chat"], "template_kwargs": {"date_string": "01 Jan 2025"}}})
    with pytest.raises(ExportError, match="pins date_str, which the checkpoint's chat template does not read"):
        _sources(tmp_path, dated, "dated.index.json", {**layout, "chat": {**layout["chat"],
                                                                          "pin": {"date_str": "01 Jan 2025"}}})
    pinned = {**layout, "chat": {**layout["chat"], "pin": {"date_string": "01 Jan 2025"}}}
    src, check = _sources(tmp_path, dated, "dated.index.json", pinned)
    assert check["warnings"] == ["the chat template's date_string is pinned to '01 Jan 2025': the engine's prompt "
                                 "keeps that for good, whatever a later rendering of the template would give"]
    tok = transformers.AutoTokenizer.from_pretrained(dated)
    h = _histories(1, most=4)[0]
    want = _chat_ids(tok, pinned, ", ".join("".join(index[i]) for i in h), date_string="01 Jan 2025")
    assert src.encoder.full(np.array([src.catalog.index_of(i) for i in h])).tolist() == want
    assert "Today Date: 01 Jan 2025" in tok.decode(want)


# -- the engine's tokenizer: the one transformers builds, not the file ----------------------------------------------
def test_engine_tokenises_as_transformers_builds_the_tokenizer(tmp_path):
    """A Qwen2 checkpoint whose tokenizer.json is a custom byte-level BPE (GPT-2 regex): transformers 5 loads it as
    Qwen2Tokenizer with Qwen's own pre-tokenizer. The engine ships and resolves with that tokenizer (its prompts
    equal AutoTokenizer's), and the export says the file differs."""
    from tokenizers import Tokenizer

    ckpt, index, items = _setup(tmp_path, "custom", ("a", "b", "c"), "qwen2", tied=False, pre_tokenizer="gpt2")
    tok, raw = transformers.AutoTokenizer.from_pretrained(ckpt), Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    histories = _histories(6, most=8)
    texts = ["Items the user bought: " + ", ".join(f'"{items[i]["title"]}" ' + "".join(index[i]) for i in h[-5:]) +
             ".\nNext item:" for h in histories]
    prompts = [tok(t)["input_ids"] for t in texts]
    assert any(raw.encode(t).ids != p for t, p in zip(texts, prompts))  # the file is not what transformers loads

    layout = {"name": "titled", "template": "Items the user bought: {history}.\nNext item:", "item": '"{title}" {sid}',
              "separator": ", ", "max_history": 5}
    (tmp_path / "titled.json").write_text(json.dumps(layout))
    report = _export(tmp_path, ckpt, "custom.index.json", prompt=str(tmp_path / "titled.json"),
                     items=tmp_path / "custom.item.json", check_users=2)
    assert report.manifest["prompt"]["assembly"] == "text" and report.prompt["item_texts_identical"] == N_ITEMS
    assert len(report.prompt["warnings"]) == 1 and "as Qwen2Tokenizer with another pre_tokenizer" in \
        report.prompt["warnings"][0]
    assert encoder_prompts(report.out, histories) == prompts
    shipped = Tokenizer.from_file(str(report.out / "tokenizer.json"))  # read as the runtime reads it
    assert all(shipped.encode(t).ids == p for t, p in zip(texts, prompts))
    titles = [f'"{v["title"]}" ' + "".join(index[k]) for k, v in items.items()]
    assert [e.ids for e in shipped.encode_batch(titles)] == tok(titles)["input_ids"]

    mini = {"name": "mini", "template": ["Can you predict the next possible item that the user may expect?\n\n",
                                         "History: {history}\n\n### Response:\n"],
            "tokenize": "segments", "separator": ", ", "max_history": 10}  # MiniOneRec-like, assembled from ids
    src, check = _sources(tmp_path, ckpt, "custom.index.json", mini)
    assert src.spec.assembly == "ids" and check["identical"] == 16


# -- checkpoint variety: bf16 sharded safetensors; a PEFT LoRA adapter merged at export -------------------------
def test_bf16_sharded_checkpoint(tmp_path):
    ckpt, _, _ = _setup(tmp_path, "bf16", ("a", "b", "c"), "qwen3", dtype="bfloat16", max_shard_size="100KB")
    assert (ckpt / "model.safetensors.index.json").is_file()
    report = _export(tmp_path, ckpt, "bf16.index.json", prompt="minionerec", check_users=2)
    assert report.prompt["hf_generate"]["identical_top10"]


def test_lora_adapter_is_merged(tmp_path):
    peft = pytest.importorskip("peft")
    base, index, _ = _setup(tmp_path, "base", ("a", "b", "c"), "qwen2")
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    adapter = tmp_path / "adapter"
    lora.save_pretrained(adapter)
    transformers.AutoTokenizer.from_pretrained(base).save_pretrained(adapter)
    from pauserec.export import ExportConfig, export_engine

    with pytest.raises(CheckpointError, match="--base"):
        export_engine(ExportConfig(checkpoint=adapter, out=tmp_path / "e0", index=tmp_path / "base.index.json",
                                   prompt="minionerec"))
    report = export_engine(ExportConfig(checkpoint=adapter, out=tmp_path / "e1", index=tmp_path / "base.index.json",
                                        prompt="minionerec", base=base, check_users=2))
    plain = _export(tmp_path, base, "base.index.json", prompt="minionerec", check_users=0)
    assert report.prompt["hf_generate"]["identical_top10"]
    from pauserec.runtime import Engine, Recommender

    h = _histories(3)
    merged = Recommender(Engine.load(report.out)).recommend(h, k=5, beams=8).scores
    assert not np.allclose(merged, Recommender(Engine.load(plain.out)).recommend(h, k=5, beams=8).scores)


# -- bad input: clear errors before any graph is built -------------------------------------------------------------
def test_bad_inputs_are_refused_with_what_to_change(tmp_path):
    from pauserec.export import ExportConfig, export_engine

    ckpt, index, _ = _setup(tmp_path, "bad", ("a", "b", "c"), "qwen3")
    idx = tmp_path / "bad.index.json"

    def export(**cfg):
        return export_engine(ExportConfig(checkpoint=ckpt, out=tmp_path / "never", **{"index": idx, **cfg}))

    with pytest.raises(CheckpointError, match="--prompt PRESET"):
        export()
    with pytest.raises(DataError, match="unknown prompt preset 'minirec'"):
        export(prompt="minirec")
    with pytest.raises(DataError, match="seqrec templates 0..16"):
        export(prompt="lc-rec:17")
    layout = tmp_path / "layout.json"
    layout.write_text(json.dumps({"template": "<|user|>{history}<answer>", "max_history": 3}))
    with pytest.raises(CheckpointError, match=r"lacks: <answer>, <\|user\|>"):
        export(prompt=str(layout))
    layout.write_text(json.dumps({"template": "{history}", "max_history": 3, "colour": "red"}))
    with pytest.raises(DataError, match="unknown field.*colour"):
        export(prompt=str(layout))
    layout.write_text(json.dumps({"template": "no history here", "max_history": 3}))
    with pytest.raises(DataError, match=r"\{history\} exactly once"):
        export(prompt=str(layout))
    layout.write_text(json.dumps({"template": {"pause": "{history}{pauses}"}, "pause_token": "<think>",
                                  "max_history": 3}))
    with pytest.raises(DataError, match="pause count: pass --pause-k"):
        export(prompt=str(layout), kind="pause")
    layout.write_text(json.dumps({"template": "{history}:", "item": "{title} {sid}", "max_history": 3}))
    with pytest.raises(DataError, match="--items"):
        export(prompt=str(layout))
    layout.write_text(json.dumps({"chat": {"user": "{history}"}, "max_history": 3}))
    with pytest.raises(CheckpointError, match="has none; give the layout a plain 'template'"):
        export(prompt=str(layout))
    wide = tmp_path / "wide.index.json"  # codes beyond the SID tokens the model was trained with
    wide.write_text(json.dumps({**index, "99": ["<a_1>", "<b_2>", f"<c_{CODES + 3}>"]}))
    with pytest.raises(CheckpointError, match=f"not single tokens of the model.*<c_{CODES}>"):
        export(prompt="minionerec", index=wide)
    with pytest.raises(CheckpointError, match="index file the model"):
        export(prompt="minionerec", index=tmp_path / "missing.json")
    assert not (tmp_path / "never").exists()


def test_encoder_decoder_and_unknown_architectures_are_refused(tmp_path):
    from pauserec.export import ExportConfig, export_engine

    for model_type, msg in (("t5", "encoder-decoder"), ("gpt_neox", "unsupported architecture")):
        d = tmp_path / model_type
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": model_type, "is_encoder_decoder": model_type == "t5"}))
        with pytest.raises(CheckpointError, match=msg):
            export_engine(ExportConfig(checkpoint=d, out=tmp_path / "e", prompt="minionerec"))


def test_a_prompt_difference_fails_and_names_the_part(tmp_path):
    """The check itself: an encoder that drops one history id is caught, with the part and the ids named."""
    from pauserec.prompt.layout import preset
    from pauserec.prompt.spec import PromptEncoder
    from pauserec.prompt.resolve import resolve_layout
    from pauserec.export.bundle import read_catalog_source
    from pauserec.prompt.hf import check_prompts
    from pauserec.export.pipeline import same_top

    ckpt, _, _ = _setup(tmp_path, "diff", ("a", "b", "c"), "qwen3")
    from tokenizers import Tokenizer

    tok, hf = Tokenizer.from_file(str(ckpt / "tokenizer.json")), transformers.AutoTokenizer.from_pretrained(ckpt)
    catalog = read_catalog_source(ckpt, tmp_path / "diff.index.json", None, False)
    layout = preset("minionerec")
    spec = resolve_layout(layout, tok, catalog, "direct", eos_id=hf.eos_token_id, pad_id=hf.eos_token_id)
    encoder = PromptEncoder(spec, catalog)
    hist = [np.array([3, 4, 5])]
    assert len(check_prompts(encoder, layout, hf, catalog, hist, None)) == 1

    class Dropping(PromptEncoder):
        def many(self, histories):
            return [h[1:] for h in super().many(histories)]

    with pytest.raises(ExportError, match=r"differs from the checkpoint tokenizer's at token \d+ \(the history\)"):
        check_prompts(Dropping(spec, catalog), layout, hf, catalog, hist, None)
    a = np.array([3, 1, 2])
    assert same_top(a, np.array([-1.0, -2.0, -2.0]), np.array([3, 2, 1]), np.array([-1.0, -2.0, -2.0]), 1e-4)
    assert not same_top(a, np.array([-1.0, -2.0, -2.5]), np.array([3, 2, 1]), np.array([-1.0, -2.0, -2.5]), 1e-4)


# -- the guard against the wrong template, on the real Scientific data ---------------------------------------------
@pytest.mark.slow
def test_popularity_guard_warns_when_the_model_is_no_better(scientific, tmp_path):
    """A random-weight model under any prompt ranks worse than popularity: the export says so (and still writes)."""
    index = scientific / "indexes" / "rkmeans_zcr" / "Scientific.index.json"
    ckpt = tmp_path / "sci"
    make_checkpoint(ckpt, arch="qwen3", sid_tokens=sid_vocab(("a", "b", "c", "d"), 256))
    said = []
    from pauserec.export import ExportConfig, export_engine

    report = export_engine(ExportConfig(checkpoint=ckpt, out=tmp_path / "engine", prompt="lc-rec", index=index,
                                        data=scientific, guard_users=200, check_users=0, prompt_sample=8),
                           progress=lambda stage, detail: said.append((stage, detail)))
    guard = report.prompt["popularity_guard"]
    assert guard["users"] == 200 and guard["popularity_hit10"] > guard["hit10"]
    assert "no better than popularity" in guard["warning"]
    assert any(stage == "WARNING" and "no better than popularity" in detail for stage, detail in said)
    assert report.manifest["prompt"]["assembly"] == "ids" and report.manifest["sid"]["codebook_sizes"] == [256] * 4


def test_export_cli_with_a_preset(tmp_path):
    """pauserec-export CKPT --prompt PRESET --index INDEX: the thin CLI over export_engine, with its report."""
    from typer.testing import CliRunner

    from pauserec.cli.export import app

    ckpt, _, _ = _setup(tmp_path, "cli", ("a", "b", "c"), "llama")
    out = tmp_path / "engine"
    res = CliRunner().invoke(app, [str(ckpt), "--out", str(out), "--prompt", "lc-rec:3", "--index",
                                   str(tmp_path / "cli.index.json"), "--check-users", "2", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output[res.output.index("{"):])
    assert report["prompt"]["hf_generate"]["identical_top10"] and report["prompt"]["identical"] == 64
    res = CliRunner().invoke(app, [str(ckpt), "--out", str(tmp_path / "e2"), "--prompt", "onerec-think", "--index",
                                   str(tmp_path / "cli.index.json")])
    assert res.exit_code == 2 and "--kind" in res.output


def test_items_dropped_by_the_token_budget_are_counted(tmp_path):
    """A text-assembled history that its token budget cuts below max_history items: the recommendation says how
    many items the engine read, and a batch job counts the row as truncated (the history's items minus those)."""
    from pauserec.runtime import Engine, Recommender
    from pauserec.frontends.batch import BatchConfig, run_batch

    ckpt, index, items = _setup(tmp_path, "budget", ("a", "b", "c"), "qwen3", tied=False)
    layout = {"name": "titled", "template": "Items the user bought: {history}.\nNext item:", "item": '"{title}" {sid}',
              "separator": ", ", "max_history": 5, "max_history_tokens": 40}
    (tmp_path / "titled.json").write_text(json.dumps(layout))
    report = _export(tmp_path, ckpt, "budget.index.json", prompt=str(tmp_path / "titled.json"),
                     items=tmp_path / "budget.item.json", check_users=0)
    rec = Recommender(Engine.load(report.out, provider="cpu"))
    histories = [h for h in _histories(8, most=5) if len(h) == 5][:2] + [_histories(1, most=1)[0]]
    out = rec.recommend(histories, k=3, beams=4)
    assert 1 <= out.kept[0] < 5 and out.kept[2] == len(histories[2])  # the budget holds fewer than 5 titled items
    rows = tmp_path / "users.jsonl"
    rows.write_text("".join(json.dumps({"user_id": f"u{i}", "history": h}) + "\n" for i, h in enumerate(histories)))
    cfg = BatchConfig(input=rows, output=tmp_path / "recs.jsonl", k=3, beams=4)
    job = run_batch(cfg, rec)
    cut = sum(1 for h, k in zip(histories, out.kept) if len(h) > k)
    assert job.truncated == cut >= 1  # (5-item histories: not beyond max_history, but beyond the token budget)
    assert json.loads(cfg.summary_path.read_text())["truncated_histories"] == cut
