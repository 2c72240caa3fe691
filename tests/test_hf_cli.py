"""`mixdepth convert` / `mixdepth export` through the CLI, on tiny Hugging Face folders built here.

- bad input of every kind (no config.json, a foreign model_type, missing or truncated shards, no
  tokenizer.json, a non-empty --out, foreign or unsupported GGUF files, unsupported rope scaling or
  activation): exit status 2, one line on stderr naming the problem, and nothing left behind;
- a Mistral folder's sliding window caps the context, and a longer forward is a one-line error;
- a sharded folder converts to the same model as its single-file twin and matches transformers;
- end to end: convert at capacity 0.125, train the routers a few steps, generate with real
  skipping (routed fraction and KV bytes printed), export, load with transformers, and `from_hf`
  of the export gives the same tensors back.

Every test name contains "hf", "convert" or "export", so `pytest -k "hf or convert or export"`
selects them all.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from mixdepth.cli import main

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
gguf = pytest.importorskip("gguf")
pytest.importorskip("jinja2")

VOCAB = 300
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
ENGLISH = """\
The old lighthouse keeper climbed the spiral stairs every evening, counting each step as his father
had taught him. Outside, the wind pushed grey waves against the rocks, and gulls circled above the
harbour looking for scraps from the fishing boats. In the village below, children ran home from
school, their boots splashing through puddles, while shopkeepers pulled down their shutters and
lit small lamps in the windows. A baker carried a tray of warm bread to the inn, where travellers
sat by the fire and told stories of distant cities, of mountains covered in snow, of deserts where
the sand sang at night. Nobody knew whether those stories were true, but everyone listened.
Science begins with questions: why does the moon change its shape, how do birds find their way
south in autumn, what makes iron rust and copper turn green? Careful measurement, patient
observation and honest reporting of results have answered many such questions, yet each answer
opens new ones. A student who learns to doubt politely and to check numbers twice will go far.
Cooking is chemistry you can eat. Onions soften and sweeten in butter over a low flame; garlic
burns quickly, so add it late. Salt draws water out of vegetables, acid brightens a heavy sauce,
and a pinch of sugar balances bitter greens. Taste often, adjust slowly, and write down what
works so that next time the soup is even better than before.
Markets rise and fall, and prices follow supply and demand in ways that economists model with
equations, graphs and a great deal of argument. Some people save money in banks, others buy land
or gold, and a few gamble everything on a single idea. History suggests that patience and a broad
mix of investments usually win over many years, although nothing is ever certain.
The committee will meet on Tuesday at nine o'clock to discuss the budget, the new library hours
and the repair of the bridge near the river. Please bring your notes, your questions and, if you
can, some coffee for the volunteers who have worked so hard this month. Thank you, and see you there!
What is the capital of France? Paris is the capital of France, and Rome is the capital of Italy.
"""


# ---- fixtures ------------------------------------------------------------------------------------
def _write_tokenizer(folder: Path) -> int:
    """A byte-level BPE trained on ENGLISH (<= VOCAB tokens) and a ChatML tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([ENGLISH], trainer=trainer)
    assert tok.get_vocab_size() <= VOCAB
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "chat_template": CHATML}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return tok.get_vocab_size()


def _save_hf(folder: Path, cfg, **save_kw) -> Path:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(str(folder), **save_kw)
    _write_tokenizer(folder)
    return folder


def _llama_config():
    return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory) -> Path:
    """A tiny random Llama folder: config.json, one model.safetensors, a ChatML BPE tokenizer."""
    folder = _save_hf(tmp_path_factory.mktemp("llama") / "tiny-llama", _llama_config())
    assert (folder / "model.safetensors").exists() and not (folder / "model.safetensors.index.json").exists()
    return folder


@pytest.fixture(scope="module")
def hf_sharded(tmp_path_factory) -> Path:
    """The same Llama (same seed) saved in shards of at most 100 KB."""
    folder = _save_hf(tmp_path_factory.mktemp("sharded") / "tiny-llama-sharded", _llama_config(),
                      max_shard_size="100KB")
    assert (folder / "model.safetensors.index.json").exists()
    assert len(list(folder.glob("model-*.safetensors"))) >= 3
    return folder


def _copy(src: Path, dst: Path, *, drop: tuple[str, ...] = (), config: dict | None = None) -> Path:
    """A copy of an HF folder without `drop`, its config.json updated with `config` (None values removed)."""
    shutil.copytree(src, dst)
    for name in drop:
        (dst / name).unlink()
    if config is not None:
        d = json.loads((dst / "config.json").read_text())
        d.update(config)
        d = {k: v for k, v in d.items() if v is not None}
        (dst / "config.json").write_text(json.dumps(d))
    return dst


def _refused(capfd, argv: list[str]) -> str:
    """Run the CLI expecting a user error: exit status 2 and exactly one line on stderr (returned)."""
    capfd.readouterr()
    with pytest.raises(SystemExit) as excinfo:
        main(argv)
    assert excinfo.value.code == 2
    err = capfd.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and "error" in lines[0]
    return lines[0]


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal tensors, NaN equal to NaN (an uncalibrated `threshold_table` is all NaN)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.isnan(), b.isnan()) and torch.equal(
        a.nan_to_num(), b.nan_to_num())


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _convert_refused(capfd, tmp_path: Path, src: Path, *extra: str, out_exists: bool = False) -> str:
    """`mixdepth convert src --out <new folder>` must fail and leave the out folder's parent as it was."""
    parent = tmp_path / "outputs"
    parent.mkdir(exist_ok=True)
    out = parent / "ck"
    if out_exists:
        out.mkdir()
    before = _listing(parent)
    line = _refused(capfd, ["convert", str(src), "--out", str(out), *extra])
    assert _listing(parent) == before  # no temporary or half-written folder beside --out
    if out_exists:
        assert _listing(out) == []
    else:
        assert not out.exists()
    return line


def _write_gguf(path: Path, arch: str, tensors) -> Path:
    w = gguf.GGUFWriter(str(path), arch=arch)
    for name, data, kw in tensors:
        w.add_tensor(name, data, **kw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("out_exists", [False, True])
def test_convert_refuses_folder_without_config(capfd, tmp_path, out_exists):
    src = tmp_path / "not-a-model"
    src.mkdir()
    (src / "README.md").write_text("nothing here\n")
    line = _convert_refused(capfd, tmp_path, src, out_exists=out_exists)
    assert "config.json" in line and str(src) in line


def test_convert_refuses_missing_source(capfd, tmp_path):
    line = _convert_refused(capfd, tmp_path, tmp_path / "nowhere")
    assert "nowhere" in line and "does not exist" in line


def test_convert_refuses_gpt2_model_type(capfd, tmp_path, hf_llama):
    src = _copy(hf_llama, tmp_path / "gpt2", config={"model_type": "gpt2"})
    line = _convert_refused(capfd, tmp_path, src)
    assert "gpt2" in line and str(src / "config.json") in line
    for name in ("llama", "mistral", "qwen2", "qwen3"):
        assert name in line


def test_convert_refuses_sharded_folder_with_a_missing_shard(capfd, tmp_path, hf_sharded):
    src = _copy(hf_sharded, tmp_path / "missing-shard")
    shard = sorted(src.glob("model-*.safetensors"))[1]
    shard.unlink()
    line = _convert_refused(capfd, tmp_path, src)
    assert shard.name in line and "missing" in line


def test_convert_refuses_truncated_shard(capfd, tmp_path, hf_sharded):
    src = _copy(hf_sharded, tmp_path / "truncated-shard")
    shard = sorted(src.glob("model-*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    line = _convert_refused(capfd, tmp_path, src)
    assert shard.name in line and "truncated" in line


def test_convert_refuses_truncated_single_file(capfd, tmp_path, hf_llama):
    src = _copy(hf_llama, tmp_path / "truncated")
    path = src / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    line = _convert_refused(capfd, tmp_path, src)
    assert str(path) in line and "truncated" in line


def test_convert_refuses_folder_without_tokenizer_json(capfd, tmp_path, hf_llama):
    src = _copy(hf_llama, tmp_path / "no-tokenizer", drop=("tokenizer.json",))
    line = _convert_refused(capfd, tmp_path, src)
    assert "tokenizer.json" in line and str(src) in line


def test_convert_refuses_non_empty_out(capfd, tmp_path, hf_llama):
    out = tmp_path / "ck"
    out.mkdir()
    (out / "keep.txt").write_text("mine\n")
    before = _listing(tmp_path)
    line = _refused(capfd, ["convert", str(hf_llama), "--out", str(out)])
    assert str(out) in line and "not empty" in line
    assert _listing(tmp_path) == before and _listing(out) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine\n"


def test_convert_refuses_unsupported_rope_scaling_and_activation(capfd, tmp_path, hf_llama):
    yarn = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 128, "rope_theta": 10000.0}
    src = _copy(hf_llama, tmp_path / "yarn", config={"rope_parameters": None, "rope_scaling": yarn,
                                                   "rope_theta": 10000.0})
    line = _convert_refused(capfd, tmp_path, src)
    assert "yarn" in line and "not supported" in line

    src = _copy(hf_llama, tmp_path / "gelu", config={"hidden_act": "gelu"})
    line = _convert_refused(capfd, tmp_path, src)
    assert "gelu" in line and "hidden_act" in line


def _undequantizable_type():
    """A GGML tensor type the installed gguf package cannot dequantize (nor is it F32/F16)."""
    from gguf import quants

    known = {"F32", "F16"} | {t.name for t in quants._type_traits}
    for name in ("Q8_K", "Q8_1"):
        qtype = gguf.GGMLQuantizationType[name]
        if name not in known:
            return qtype
    pytest.skip("this gguf package dequantizes every block type tried")


def test_convert_refuses_bad_gguf_files(capfd, tmp_path):
    import numpy as np

    gpt2 = _write_gguf(tmp_path / "gpt2.gguf", "gpt2", [("token_embd.weight", np.zeros((4, 4), np.float32), {})])
    line = _convert_refused(capfd, tmp_path, gpt2)
    assert "gpt2" in line and "architecture" in line and "llama" in line and str(gpt2) in line

    qtype = _undequantizable_type()
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    quant = _write_gguf(tmp_path / "quant.gguf", "llama", [
        ("token_embd.weight", np.zeros(2 * size, np.uint8), {"raw_shape": (2, size), "raw_dtype": qtype})])
    assert gguf.GGUFReader(str(quant)).tensors[0].tensor_type == qtype
    line = _convert_refused(capfd, tmp_path, quant)
    assert qtype.name in line and "quantisation" in line and str(quant) in line

    truncated = tmp_path / "truncated.gguf"
    data = quant.read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    line = _convert_refused(capfd, tmp_path, truncated)
    assert str(truncated) in line and "GGUF" in line

    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"this is not a gguf file at all\n" * 10)
    line = _convert_refused(capfd, tmp_path, garbage)
    assert str(garbage) in line and "GGUF" in line

    plain = tmp_path / "weights.bin"
    plain.write_bytes(b"\0" * 64)
    line = _convert_refused(capfd, tmp_path, plain)
    assert str(plain) in line and ".gguf" in line


def test_convert_failure_removes_the_out_parents_it_created(capfd, tmp_path, hf_llama):
    bad = _copy(hf_llama, tmp_path / "gelu", config={"hidden_act": "gelu"})
    (tmp_path / "outputs").mkdir()
    out = tmp_path / "outputs" / "new" / "deeper" / "ck"
    line = _refused(capfd, ["convert", str(bad), "--out", str(out)])
    assert "gelu" in line
    assert _listing(tmp_path / "outputs") == []  # neither new/ nor new/deeper/ stays behind
    assert main(["convert", str(hf_llama), "--out", str(out)]) == 0  # and a good conversion creates them
    assert (out / "model.safetensors").is_file() and _listing(out.parent) == ["ck"]


def test_hf_gguf_errors_leave_no_temporary_folder(tmp_path, monkeypatch):
    """The Python API reads a GGUF's tokenizer into a temporary folder: a failed read removes it."""
    import tempfile

    import numpy as np

    from mixdepth import from_hf
    from mixdepth.hf import load_hf

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    bad = _write_gguf(tmp_path / "gpt2.gguf", "gpt2", [("token_embd.weight", np.zeros((4, 4), np.float32), {})])
    for fn in (from_hf, load_hf):
        with pytest.raises(ValueError, match="architecture 'gpt2' is not supported"):
            fn(bad)
        assert _listing(scratch) == []


def test_export_refuses_bad_input(capfd, tmp_path):
    line = _refused(capfd, ["export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "hf")])
    assert "nowhere" in line
    assert not (tmp_path / "hf").exists()


# ---- sliding window ------------------------------------------------------------------------------
def test_convert_mistral_sliding_window_caps_context(capfd, tmp_path):
    from mixdepth.checkpoint import load_model

    cfg = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                     sliding_window=64)
    src = _save_hf(tmp_path / "tiny-mistral", cfg)
    out = tmp_path / "ck"
    assert main(["convert", str(src), "--out", str(out)]) == 0
    assert "context 64" in capfd.readouterr().out
    model = load_model(out)
    assert model.cfg.family == "mistral" and model.cfg.sliding_window == 64 and model.cfg.max_seq_len == 64

    # within the window the converted model is the source model
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (2, 64))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mode="dense").logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
        with pytest.raises(ValueError, match="sliding window") as excinfo:
            model(torch.randint(0, VOCAB, (1, 65)), mode="dense")
    assert len(str(excinfo.value).splitlines()) == 1

    # generating past the window is a one-line CLI error too (--fraction 1: no "never calibrated" note)
    line = _refused(capfd, ["generate", "--checkpoint", str(out), "--prompt", "the " * 80, "--max-new-tokens", "4",
                            "--temperature", "0", "--fraction", "1", "--device", "cpu"])
    assert "context of 64" in line


# ---- sharded folders -----------------------------------------------------------------------------
def test_convert_sharded_equals_single_file_and_hf(capfd, tmp_path, hf_llama, hf_sharded):
    from mixdepth.checkpoint import load_model

    for src, out in ((hf_llama, tmp_path / "single"), (hf_sharded, tmp_path / "sharded")):
        assert main(["convert", str(src), "--out", str(out)]) == 0
    assert _listing(tmp_path) == ["sharded", "single"]
    single, sharded = load_model(tmp_path / "single"), load_model(tmp_path / "sharded")
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(hf_sharded), dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (2, 48))
    with torch.no_grad():
        a, b = single(ids, mode="dense").logits, sharded(ids, mode="dense").logits
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(b, ref(ids).logits, rtol=1e-4, atol=1e-4)
    other = sharded.state_dict()
    for k, v in single.state_dict().items():  # the same weights, and the same seeded new routers
        assert _equal(v, other[k]), k


# ---- end to end ----------------------------------------------------------------------------------
def _is_routing(key: str) -> bool:
    return ".router." in key or ".predictor." in key


def test_convert_train_generate_export_hf_end_to_end(capfd, tmp_path, hf_llama):
    from safetensors.torch import load_file

    from mixdepth import from_hf
    from mixdepth.checkpoint import load_checkpoint_tokenizer, load_model, resolve_checkpoint

    ck, run, hfdir = tmp_path / "ck", tmp_path / "run", tmp_path / "hfdir"
    # 1. convert at 12.5% capacity
    assert main(["convert", str(hf_llama), "--out", str(ck), "--routing.capacity", "0.125"]) == 0
    out = capfd.readouterr().out
    assert "capacity 0.125" in out and str(ck) in out
    assert json.loads((ck / "config.json").read_text())["routing"]["capacity"] == 0.125
    assert (ck / "tokenizer.json").read_bytes() == (hf_llama / "tokenizer.json").read_bytes()

    # 2. train only the routers a few steps
    corpus = tmp_path / "corpus.txt"
    sonnets = (Path(__file__).parent / "data" / "sonnets.txt").read_text()
    corpus.write_text(ENGLISH + sonnets[:5000])
    assert main(["train", "--init", str(ck), "--train.trainable", "routing", "--train.max_steps", "6",
                 "--train.seq_len", "64", "--train.batch_size", "4", "--train.eval_every", "0",
                 "--train.eval_batches", "2", "--train.warmup_steps", "1", "--train.lr", "1e-2",
                 "--train.data", str(corpus), "--train.cache_dir", str(tmp_path / "cache"), "--train.device", "cpu",
                 "--no-progress", "--out", str(run)]) == 0
    assert "6 steps" in capfd.readouterr().out
    final = resolve_checkpoint(run)
    before, after = load_file(str(ck / "model.safetensors")), load_file(str(final / "model.safetensors"))
    assert before.keys() == after.keys()
    trunk = [k for k in before if not _is_routing(k) and "threshold" not in k]
    routers = [k for k in before if _is_routing(k)]
    assert trunk and routers
    for k in trunk:
        assert torch.equal(before[k], after[k]), f"{k} changed, but only the routers train"
    assert any(not torch.equal(before[k], after[k]) for k in routers)
    # the run's checkpoint carries the HF tokenizer (with its chat template) and calibrated thresholds
    assert (final / "tokenizer.json").read_bytes() == (hf_llama / "tokenizer.json").read_bytes()
    tok = load_checkpoint_tokenizer(run)
    assert tok.kind == "hf" and tok.chat_template == CHATML and tok.eos_token == "<|im_end|>"
    tables = [v for k, v in after.items() if k.endswith("threshold_table")]
    assert tables and all(not torch.isnan(t).any() for t in tables)
    assert all(torch.isnan(v).all() for k, v in before.items() if k.endswith("threshold_table"))

    # 3. generate with real skipping, plain and chat
    for extra in ([], ["--chat"]):
        assert main(["generate", "--checkpoint", str(run), "--prompt", "The old lighthouse keeper",
                     "--max-new-tokens", "16", "--temperature", "0", "--device", "cpu", *extra]) == 0
        out = capfd.readouterr().out
        routed = re.search(r"^routed fraction: (.*)$", out, re.M)
        assert routed, out
        fractions = [float(x) for x in re.findall(r"layer \d+: ([\d.]+)%", routed.group(1))]
        assert fractions and min(fractions) < 100.0, out
        kv = re.search(r"^KV cache: .*\(([\d.]+)x\)$", out, re.M)
        assert kv and float(kv.group(1)) < 1.0, out

    # 4. export --format llama: transformers loads the dense function, from_hf gives back the MoD model
    assert main(["export", str(run), "--out", str(hfdir), "--format", "llama"]) == 0
    assert str(hfdir) in capfd.readouterr().out
    for name in ("config.json", "model.safetensors", "mixdepth_routing.safetensors", "mixdepth.json",
                 "tokenizer.json", "tokenizer_config.json"):
        assert (hfdir / name).is_file(), name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    model = load_model(run)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(hfdir), dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mode="dense").logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
    back = from_hf(hfdir)
    assert back.cfg.to_dict() == model.cfg.to_dict()
    mine, theirs = model.state_dict(), back.state_dict()
    assert mine.keys() == theirs.keys()
    for k, v in mine.items():
        assert _equal(v, theirs[k]), k
    assert any(not torch.equal(before[k], theirs[k]) for k in routers)  # the trained routers came back

    # exporting again to the same (now non-empty) folder is refused
    line = _refused(capfd, ["export", str(run), "--out", str(hfdir)])
    assert "not empty" in line


# ---- help ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["convert", "export"])
def test_convert_export_help(capsys, command):
    with pytest.raises(SystemExit) as excinfo:
        main([command, "-h"])
    assert excinfo.value.code == 0
    out = capsys.readouterr().out
    assert "--out" in out and f"mixdepth {command}" in out
