"""Prompt tokenizers: the built-in byte tokenizer, SentencePiece (a model trained here), Pi0.5's
state discretization and state span, prompt length limits."""

from __future__ import annotations

import re

import numpy as np
import pytest

from kvreuse.model import preset
from kvreuse.model.tokenizer import (
    ByteTokenizer,
    SentencePieceTokenizer,
    discretize_state,
    load_tokenizer,
    tokenize_prompts,
)

def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode("pick up the Ümlaut block")
    assert min(ids) >= 4 and max(ids) < tok.vocab_size
    assert tok.decode(ids) == "pick up the Ümlaut block"


def test_pi0_prompt_layout_and_mask():
    cfg = preset("tiny-pi0")
    out = tokenize_prompts(cfg, ByteTokenizer(), ["open_the drawer", "go"])
    assert out.tokens.shape == out.mask.shape == (2, cfg.max_token_len)
    row = out.tokens[0][out.mask[0]].tolist()
    assert row[0] == ByteTokenizer.bos_id
    assert ByteTokenizer().decode(row[1:]) == "open the drawer\n"  # underscores cleaned, newline added
    assert int(out.mask[1].sum()) == 1 + len("go\n")
    assert (out.tokens[~out.mask] == ByteTokenizer.pad_id).all()
    assert not out.state_mask.any()


def test_sentencepiece_trained_model(sp_model):
    tok = SentencePieceTokenizer(sp_model)
    assert tok.bos_id == 2 and tok.pad_id == 0 and tok.vocab_size == 120
    cfg = preset("tiny-pi0", tokenizer="sentencepiece")
    loaded = load_tokenizer(cfg, sp_model)
    out = tokenize_prompts(cfg, loaded, ["open the top drawer"])
    ids = out.tokens[0][out.mask[0]].tolist()
    assert ids[0] == 2 and len(ids) < len("open the top drawer")  # pieces, not bytes
    assert loaded.decode(ids[1:]).strip() == "open the top drawer"


@pytest.mark.parametrize("variant", ["tiny-pi0", "tiny-pi05"])
def test_a_prompt_without_the_state_is_tokenized_as_the_training_pipeline_did(sp_model, variant):
    """openpi encodes the cleaned task and "\\n" apart; lerobot 0.6.1 (Pi0NewLineProcessor, then the
    tokenizer) appends "\\n" to the task as given, underscores and all, and encodes it whole. kvreuse
    did both the openpi way: clean, then one encode. A reference checkpoint gets its pipeline's style."""
    cfg = preset(variant, tokenizer="sentencepiece", discrete_state_input=False)
    tok = load_tokenizer(cfg, sp_model)
    task = " open_the top drawer"

    def ids(style):
        out = tokenize_prompts(cfg.replace(prompt_style=style), tok, [task])
        return out.tokens[0][out.mask[0]].tolist()

    assert ids("openpi") == [tok.bos_id] + tok.encode("open the top drawer") + tok.encode("\n")
    assert ids("lerobot") == [tok.bos_id] + tok.encode(" open_the top drawer\n")
    assert ids("kvreuse") == [tok.bos_id] + tok.encode("open the top drawer\n")
    assert ids("lerobot") != ids("openpi")  # (this model has no piece that spans the newline: openpi = kvreuse)


def test_sentencepiece_errors(sp_model, tmp_path):
    cfg = preset("tiny-pi0", tokenizer="sentencepiece")
    with pytest.raises(ValueError, match="needs the PaliGemma SentencePiece tokenizer"):
        load_tokenizer(cfg, None)
    with pytest.raises(ValueError, match="no SentencePiece model at"):
        load_tokenizer(cfg, tmp_path / "missing.model")
    with pytest.raises(ValueError, match="120 pieces but the model's vocabulary is 100"):
        load_tokenizer(cfg.replace(vocab_size=100), sp_model)
    with pytest.raises(ValueError, match="uses the built-in byte tokenizer; --tokenizer"):  # not silently unused
        load_tokenizer(preset("tiny-pi0"), sp_model)


def test_tokenizer_that_is_not_a_sentencepiece_file_is_named(sp_model, tmp_path):
    """A directory, or a Hugging Face tokenizer.json / any other file, is one ValueError naming the path
    (sentencepiece itself raises a RuntimeError that used to reach the user as a traceback)."""
    cfg = preset("tiny-pi0", tokenizer="sentencepiece")
    with pytest.raises(ValueError, match=f"tokenizer {tmp_path}: a directory, expected the PaliGemma tokenizer.model"):
        load_tokenizer(cfg, tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(sp_model.read_bytes())
    with pytest.raises(ValueError, match=f"did you mean {tmp_path / 'tokenizer.model'}"):
        load_tokenizer(cfg, tmp_path)
    assert load_tokenizer(cfg, tmp_path / "tokenizer.model").vocab_size == 120
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Unigram", "vocab": []}}')
    with pytest.raises(ValueError, match=f"tokenizer {tmp_path / 'tokenizer.json'}: not a SentencePiece model"):
        load_tokenizer(cfg, tmp_path / "tokenizer.json")


def test_sentencepiece_model_without_bos_is_refused(tmp_path):
    """Another SentencePiece model (T5's has no <bos>): bos_id -1 started every prompt and failed
    in the embedding, at the first call, as an IndexError."""
    spm = pytest.importorskip("sentencepiece")
    (tmp_path / "c.txt").write_text("open the drawer and pick up the block\n" * 30)
    spm.SentencePieceTrainer.train(input=str(tmp_path / "c.txt"), model_prefix=str(tmp_path / "t5"), vocab_size=30,
                                   model_type="bpe", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    cfg = preset("tiny-pi0", tokenizer="sentencepiece")
    with pytest.raises(ValueError, match=re.escape(f"tokenizer {tmp_path / 't5.model'}: a SentencePiece model "
                                                   "without a <bos> piece")):
        load_tokenizer(cfg, tmp_path / "t5.model")


def test_discretize_state_bins():
    s = np.array([-1.0, -0.999, 0.0, 0.5, 0.999, 1.0, 7.0, -7.0])
    b = discretize_state(s, 256)
    assert b.tolist() == [0, 0, 128, 192, 255, 255, 255, 0]
    # openpi's and lerobot's np.digitize(state, edges) - 1: below -1 is bin -1, the rest the same
    assert discretize_state(s, 256, "digitize").tolist() == [0, 0, 128, 192, 255, 255, 255, -1]
    assert discretize_state(np.linspace(-1, 1, 1000), 256).tolist() == sorted(discretize_state(np.linspace(-1, 1, 1000), 256).tolist())


@pytest.mark.parametrize("use_sp", [False, True])
def test_pi05_state_in_prompt_and_state_mask(use_sp, sp_model):
    cfg = preset("tiny-pi05")
    tok = ByteTokenizer()
    if use_sp:
        cfg = cfg.replace(tokenizer="sentencepiece", vocab_size=120)
        tok = load_tokenizer(cfg, sp_model)
    state = np.array([[-1.0, 0.0, 0.5, 1.0], [0.1, 0.2, 0.3, 0.4]])
    out = tokenize_prompts(cfg, tok, ["open the drawer", "open the drawer"], state)
    ids = out.tokens[0][out.mask[0]].tolist()
    text = tok.decode(ids[1:])
    assert text.replace("▁", " ").strip().startswith("Task: open the drawer, State: 0 128 192 255;")
    assert text.rstrip().endswith("Action:")
    sm = out.state_mask[0]
    assert sm.any() and not (sm & ~out.mask[0]).any()  # only valid tokens
    first = int(sm.float().argmax())
    assert sm[first:int(out.mask[0].sum())].all()  # one contiguous span to the end of the prompt
    assert "State" not in tok.decode(out.tokens[0][1:first].tolist())
    assert "0 128 192 255" in tok.decode(out.tokens[0][first:][sm[first:]].tolist())
    # The text part is the same for both rows; only the state part differs.
    assert out.tokens[0][:first].tolist() == out.tokens[1][:first].tolist()
    assert out.tokens[0].tolist() != out.tokens[1].tolist()


def test_pi05_without_state_input_uses_pi0s_prompt():
    """discrete_state_input=False (openpi's pi05_libero): Pi0's prompt, no state tokens."""
    cfg = preset("tiny-pi05", discrete_state_input=False)
    out = tokenize_prompts(cfg, ByteTokenizer(), ["open the drawer"], None)
    pi0 = tokenize_prompts(preset("tiny-pi0", max_token_len=cfg.max_token_len), ByteTokenizer(), ["open the drawer"])
    assert out.tokens.tolist() == pi0.tokens.tolist() and out.mask.tolist() == pi0.mask.tolist()
    assert not out.state_mask.any()


def test_pi05_needs_a_state():
    with pytest.raises(ValueError, match=r"^state: Pi0\.5 writes the state into the prompt, but no state was given$"):
        tokenize_prompts(preset("tiny-pi05"), ByteTokenizer(), ["x"], None)


def test_overlong_prompt_is_an_error_unless_truncated():
    cfg = preset("tiny-pi0")
    long = "a" * (cfg.max_token_len + 5)
    with pytest.raises(ValueError, match=f"exceed max_token_len={cfg.max_token_len}"):
        tokenize_prompts(cfg, ByteTokenizer(), [long])
    out = tokenize_prompts(cfg, ByteTokenizer(), [long], truncate=True)
    assert out.mask.all() and out.tokens.shape[1] == cfg.max_token_len
    # Exactly at the limit is fine without truncation.
    ok = "a" * (cfg.max_token_len - 2)  # + bos + newline
    assert tokenize_prompts(cfg, ByteTokenizer(), [ok]).mask.all()


def test_pi05_state_below_range_as_the_reference_writes_it():
    """A full-size Pi0.5 (and any lerobot / openpi checkpoint) writes a state below -1 as bin -1, as
    openpi and lerobot 0.6.1 do; it was clipped to 0, a prompt the model never saw in training. The
    testbed presets keep the clip they were trained with."""
    assert preset("pi05").state_below_bins == preset("pi0").state_below_bins == "digitize"
    assert preset("tiny-pi05").state_below_bins == "clip"
    state = np.array([[-1.5, 0.0, 1.5, -1.0]])
    for cfg, want in ((preset("tiny-pi05", state_below_bins="digitize"), "State: -1 128 255 0;"),
                      (preset("tiny-pi05"), "State: 0 128 255 0;")):
        out = tokenize_prompts(cfg, ByteTokenizer(), ["push"], state)
        assert want in ByteTokenizer().decode(out.tokens[0][out.mask[0]].tolist()[1:])
