"""MoD inside the Hugging Face stack (issue 28): `MixdepthForCausalLM` through transformers, Trainer,
PEFT and lm-evaluation-harness, on a tiny calibrated model exported here, offline.

Every test name holds "transformers", "trainer", "peft", "lm_eval" or "automodel", so the bar's
`pytest -k "transformers or trainer or peft or lm_eval or automodel"` selects them all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mixdepth.checkpoint import load_config, load_model, save_checkpoint  # noqa: E402
from mixdepth.config import ModelConfig  # noqa: E402
from mixdepth.generate import generate  # noqa: E402
from mixdepth.hf import MixdepthCache, MixdepthForCausalLM, to_transformers  # noqa: E402
from mixdepth.model import MoDTransformer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [list(b"ROMEO:\nWhat say you"), list(b"To be"), list(b"Now is the winter of")]


def _model() -> MoDTransformer:
    """The debug preset (routed layers 1 and 3) with its causal thresholds calibrated at 0.4 on
    random bytes, so rows route differently and routed layers skip tokens."""
    torch.manual_seed(0)
    model = MoDTransformer(ModelConfig.from_name("debug")).eval()
    model.calibrate_causal(torch.randint(0, 256, (8, 96)), fraction=0.4, dial=[0.1, 0.25, 0.4, 0.6, 0.9])
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(our model, its checkpoint folder, its transformers export)."""
    root = tmp_path_factory.mktemp("hfstack")
    model = _model()
    ck = save_checkpoint(root / "ck", model)
    out = to_transformers(model, root / "hf")
    return model, ck, out


@pytest.fixture(scope="module")
def hf_model(exported):
    return transformers.AutoModelForCausalLM.from_pretrained(str(exported[2]), trust_remote_code=True).eval()


def _left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(map(len, prompts))
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(p)
        mask[b, T - len(p):] = 1
    return ids, mask


# ---- generate ------------------------------------------------------------------------------------
def test_transformers_generate_equals_mixdepth_generate_and_skips_in_the_cache(exported, hf_model):
    """Greedy HF `generate` gives `mixdepth.generate`'s tokens for batch 1 and for a left-padded
    batch of prompts of different lengths; the routed layers' caches hold exactly the tokens that
    entered their blocks (counted against our generation's routing), fewer than the dense layers'."""
    model = exported[0]
    n = 12
    want = generate(model, PROMPTS, max_new_tokens=n).run()
    for p, w in zip(PROMPTS, want.tokens):  # batch 1, through the cache generate makes
        alone = generate(model, [p], max_new_tokens=n).run().tokens[0]
        assert alone == w
        out = hf_model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False)
        assert out[0, len(p):].tolist() == w
    ids, mask = _left_pad(PROMPTS)
    cache = MixdepthCache(hf_model.model, ids.shape[1] + n)
    out = hf_model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0, cache=cache)
    assert out[:, ids.shape[1]:].tolist() == want.tokens
    kv = cache.kv
    fed = [len(p) + n - 1 for p in PROMPTS]  # the last new token is never fed
    assert kv.seq_lengths.tolist() == fed
    counts = cache.routed_counts()
    assert sorted(counts) == model.cfg.routed_layer_ids == [1, 3]
    for j, lid in enumerate(want.routed_layers):
        entered = [int(r[j].sum()) for r in want.routing]
        assert counts[lid].tolist() == entered
        assert all(0 < e < f for e, f in zip(entered, fed))  # skipped some, ran some, in every row
    for lid in (0, 2):
        assert kv.layers[lid].lengths.tolist() == fed
    # without a cache (full recomputation) and with chunked prefill: the same tokens
    for kw in ({"use_cache": False}, {"prefill_chunk_size": 5}):
        again = hf_model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0, **kw)
        assert again[:, ids.shape[1]:].tolist() == want.tokens, kw
    # sampling skips too; `pipeline` gives the greedy text
    cache = MixdepthCache(hf_model.model, ids.shape[1] + n)
    hf_model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=True, top_k=20, pad_token_id=0, cache=cache)
    assert all(bool((c < torch.tensor(fed)).all()) for c in cache.routed_counts().values())
    tok = transformers.AutoTokenizer.from_pretrained(str(exported[2]))
    pipe = transformers.pipeline("text-generation", model=hf_model, tokenizer=tok)
    text = pipe(bytes(PROMPTS[1]).decode(), max_new_tokens=n, do_sample=False)[0]["generated_text"]
    assert text == bytes(PROMPTS[1] + want.tokens[1]).decode("utf-8", errors="replace")


def test_transformers_generate_holds_the_compute_dial_per_call(exported, hf_model):
    """`generate(..., mixdepth_fraction=f)` and a generation-config field route as our `generate`
    at fraction f (the library's rule), per call: the model's thresholds are untouched."""
    model = exported[0]
    p = PROMPTS[0]
    before = [layer.causal_threshold.clone() for layer in hf_model.model.routed_layers]
    for f, rule in ((0.2, "hold"), (0.9, "threshold"), (0.5, None)):
        res = generate(model, [p], max_new_tokens=10, fraction=f, fraction_rule=rule).run()
        cache = MixdepthCache(hf_model.model, 64)
        out = hf_model.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, cache=cache,
                                mixdepth_fraction=f, **({"mixdepth_fraction_rule": rule} if rule else {}))
        assert out[0, len(p):].tolist() == res.tokens[0]
        assert {k: v.tolist() for k, v in cache.routed_counts().items()} == {
            lid: [int(res.routing[0][j].sum())] for j, lid in enumerate(res.routed_layers)}
    low, high = (generate(model, [p], max_new_tokens=10, fraction=f).run() for f in (0.2, 0.9))
    assert sum(low.routed_fraction.values()) < sum(high.routed_fraction.values())
    config = transformers.GenerationConfig(max_new_tokens=10, do_sample=False, mixdepth_fraction=0.2)
    out = hf_model.generate(torch.tensor([p]), generation_config=config)
    assert out[0, len(p):].tolist() == low.tokens[0]
    assert all(torch.equal(a, layer.causal_threshold) for a, layer in zip(before, hf_model.model.routed_layers))
    with pytest.raises(ValueError, match="cache_implementation"):
        hf_model.generate(torch.tensor([p]), max_new_tokens=2, cache_implementation="static")


def test_transformers_generation_config_fraction_holds_without_a_cache_too(hf_model):
    """`mixdepth_fraction` in the generation config routes as the argument does with use_cache=False
    as well (each step a full forward): the scores of every step equal the cached generation's."""
    p = torch.tensor([PROMPTS[0]])
    for f, rule in ((0.1, "threshold"), (0.3, "hold")):
        scores = []
        for use_cache in (True, False):
            config = transformers.GenerationConfig(max_new_tokens=6, do_sample=False, mixdepth_fraction=f,
                                                   mixdepth_fraction_rule=rule, use_cache=use_cache,
                                                   return_dict_in_generate=True, output_logits=True)
            scores.append(torch.stack(hf_model.generate(p, generation_config=config).logits))
        torch.testing.assert_close(scores[1], scores[0], rtol=1e-5, atol=1e-5)


def test_transformers_forward_takes_the_fraction_for_a_cache_not_yet_started(hf_model):
    """`model(x, cache=MixdepthCache(...), mixdepth_fraction=f)` starts the cache at f (the logits and
    routing of the call without a cache at f); a started cache refuses another fraction in one line
    and is left as it was."""
    x = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        want = hf_model(x, mixdepth_fraction=0.9).logits
        cache = MixdepthCache(hf_model)
        out = hf_model(x, cache=cache, mixdepth_fraction=0.9)
        torch.testing.assert_close(out.logits, want, rtol=1e-5, atol=1e-5)
        assert out.cache is cache and cache.fraction == 0.9
        counts = {k: v.clone() for k, v in cache.routed_counts().items()}
        with pytest.raises(ValueError, match="mixdepth_fraction is fixed") as e:
            hf_model(x[:, :1], cache=cache, mixdepth_fraction=0.2)
        assert "\n" not in str(e.value) and cache.columns == 24
        assert all(torch.equal(v, cache.routed_counts()[k]) for k, v in counts.items())


def test_transformers_beam_search_reorders_the_cache_rows(hf_model):
    """Beam search over a left-padded batch: with the cache (rows reordered whole, each with its own
    fill lengths) it gives the beams of the full recomputation without a cache, at the calibrated
    thresholds, at a threshold fraction and at a fraction held by the hold rule (each row's dial
    state moves with it)."""
    ids, mask = _left_pad(PROMPTS)
    for extra in ({}, {"mixdepth_fraction": 0.6, "mixdepth_fraction_rule": "threshold"},
                  {"mixdepth_fraction": 0.3, "mixdepth_fraction_rule": "hold"}):
        kw = dict(attention_mask=mask, max_new_tokens=8, num_beams=3, num_return_sequences=2, do_sample=False,
                  pad_token_id=0, **extra)
        cached = hf_model.generate(ids, **kw)
        full = hf_model.generate(ids, use_cache=False, **kw)
        assert cached.shape == (6, ids.shape[1] + 8) and torch.equal(cached, full)
        assert len({tuple(r) for r in cached[:, ids.shape[1]:].tolist()}) > 3  # beams differ


# ---- logits and losses ---------------------------------------------------------------------------
def test_automodel_logits_equal_ours_in_causal_mode_with_left_padding(exported, hf_model):
    """`from_pretrained` logits equal ours (fp32, 1e-5): eval mode routes causally; a left-padded
    row gives its unpadded logits at its real columns. Training mode with labels returns our
    training objective (LM loss + weighted router losses, top-k routing)."""
    model = exported[0]
    assert not hf_model.training and hf_model.dtype == torch.float32
    x = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        ours = model(x, mode="causal").logits
        theirs = hf_model(x).logits
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
        for keep, cols in ((1, [-1]), (3, [-3, -2, -1]), (torch.tensor([0, 5, 39]), [0, 5, 39])):  # as transformers
            torch.testing.assert_close(hf_model(x, logits_to_keep=keep).logits, theirs[:, cols], rtol=1e-5, atol=1e-5)
        plain = hf_model(x, return_dict=False)  # a tuple, as transformers' models give
        assert type(plain) is tuple and len(plain) == 1 and torch.equal(plain[0], theirs)
        ids, mask = _left_pad(PROMPTS)
        padded = hf_model(ids, attention_mask=mask).logits
        for b, p in enumerate(PROMPTS):
            alone = model(torch.tensor([p]), mode="causal").logits[0]
            torch.testing.assert_close(padded[b, ids.shape[1] - len(p):], alone, rtol=1e-5, atol=1e-5)
    hf_model.train()
    try:
        y = torch.randint(0, 256, (2, 40))
        out = hf_model(y, labels=y)
        targets = torch.cat([y[:, 1:], torch.full((2, 1), -100)], dim=1)
        want = model(y, targets, mode="topk")
        torch.testing.assert_close(out.loss, want.loss, rtol=1e-5, atol=1e-6)
        assert want.losses and float(want.loss.detach()) != float(want.lm_loss.detach())  # router terms are in it
    finally:
        hf_model.eval()


def test_automodel_takes_position_ids_that_count_real_tokens_and_refuses_packed_ones(hf_model):
    """position_ids as transformers derives them (each row's real tokens counted, through a cache
    too) change nothing; position_ids that restart inside a row (packed sequences, transformers'
    `DataCollatorWithFlattening`) would be ignored, so they are refused in one line."""
    ids, mask = _left_pad(PROMPTS)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        want = hf_model(ids, attention_mask=mask).logits
        torch.testing.assert_close(hf_model(ids, attention_mask=mask, position_ids=pos).logits, want)
        cache = MixdepthCache(hf_model)
        hf_model(ids, attention_mask=mask, position_ids=pos, cache=cache)
        nxt = torch.tensor([[1], [2], [3]])
        step = hf_model(nxt, attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1), cache=cache,
                        position_ids=pos[:, -1:] + 1)
        assert cache.columns == ids.shape[1] + 1 and step.logits.shape == (3, 1, 256)
        packed = torch.arange(20)[None] % 10  # two documents of 10 tokens in one row
        with pytest.raises(ValueError, match="position_ids") as e:
            hf_model(torch.randint(0, 256, (1, 20)), position_ids=packed)
        assert "\n" not in str(e.value)


# ---- loading, saving, registration ---------------------------------------------------------------
def test_automodel_save_pretrained_round_trips_and_the_cli_reads_the_export(exported, hf_model, tmp_path, capsys,
                                                                           corpus):
    """save_pretrained of the loaded model loads back with the same weights and logits; the export
    holds routers and calibration in one state dict; `mixdepth generate` and the checkpoint loader
    (generate/eval/train --init) read the folder directly."""
    from safetensors import safe_open

    from mixdepth.cli import main
    from mixdepth.evaluate import run_eval

    model, ck, out = exported
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "mixdepth" and cfg["auto_map"]["AutoModelForCausalLM"].startswith("modeling_mixdepth")
    for name in ("configuration_mixdepth.py", "modeling_mixdepth.py", "tokenizer.json", "generation_config.json"):
        assert (out / name).is_file(), name
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    for lid in (1, 3):
        assert {f"model.layers.{lid}.router.weight", f"model.layers.{lid}.threshold_table"} <= keys
    hf_model.save_pretrained(str(tmp_path / "again"))
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "again"), trust_remote_code=True).eval()
    sd, back = hf_model.state_dict(), again.state_dict()
    assert sd.keys() == back.keys() and all(torch.equal(v, back[k]) for k, v in sd.items())
    x = torch.randint(0, 256, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, hf_model(x).logits, rtol=0, atol=0)
    assert load_config(out).to_dict() == model.cfg.to_dict()
    loaded = load_model(out)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    texts = []
    for folder in (ck, out):
        assert main(["generate", "--checkpoint", str(folder), "--prompt", "To be", "--max-new-tokens", "8"]) == 0
        texts.append(capsys.readouterr().out.split("\n---")[0])
    assert texts[0] == texts[1]
    evals = [run_eval(folder, data=str(corpus), batches=1, batch_size=2, seq_len=32, device="cpu",
                      cache_dir=str(tmp_path / "cache")) for folder in (ck, out)]
    assert evals[0]["loss_causal"] == evals[1]["loss_causal"] and evals[0]["loss_topk"] == evals[1]["loss_topk"]
    assert main(["train", "--init", str(out), "--train.max_steps", "1", "--train.seq_len", "32", "--train.batch_size",
                 "2", "--train.eval_every", "0", "--train.data", str(corpus), "--train.cache_dir",
                 str(tmp_path / "cache"), "--train.device", "cpu", "--no-progress", "--out",
                 str(tmp_path / "run")]) == 0
    assert "1 steps" in capsys.readouterr().out


def test_automodel_resize_token_embeddings_keeps_the_config_in_step(exported, tmp_path):
    """`resize_token_embeddings` (adding tokens for fine-tuning) changes our config's vocab_size too:
    the new ids are accepted, the head stays our `Linear`, and the saved folder loads with the same
    logits (tied and untied embeddings)."""
    from mixdepth.model.layers import Linear

    torch.manual_seed(0)
    untied = MixdepthForCausalLM.from_model(MoDTransformer(ModelConfig.from_name("debug", tie_embeddings=False)))
    tied = transformers.AutoModelForCausalLM.from_pretrained(str(exported[2]))
    for name, model in (("tied", tied), ("untied", untied)):
        model.eval().resize_token_embeddings(260)
        assert model.model.cfg.vocab_size == model.config.mixdepth["vocab_size"] == 260
        assert type(model.model.lm_head) is Linear and model.model.lm_head.out_features == 260
        x = torch.tensor([[259, 1, 2, 258]])
        with torch.no_grad():
            logits = model(x).logits
        assert logits.shape == (1, 4, 260)
        model.save_pretrained(str(tmp_path / name))
        again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / name)).eval()
        with torch.no_grad():
            torch.testing.assert_close(again(x).logits, logits, rtol=0, atol=0)
        assert load_model(tmp_path / name).cfg.vocab_size == 260


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300)


def test_automodel_knows_mixdepth_after_import_and_refuses_remote_code_unless_trusted(exported):
    """`import mixdepth` loads no transformers; afterwards (imported before or after transformers, or
    after its Auto classes) AutoConfig/AutoModelForCausalLM load the export without remote code.
    Without mixdepth imported, transformers refuses the folder's code unless trust_remote_code=True,
    in its own words."""
    code = r"""
import sys
first = sys.argv[2]
if first == "transformers":
    import transformers
if first == "auto classes":  # loaded already: registered at once, not by the import hook
    from transformers import AutoConfig, AutoModelForCausalLM
import mixdepth
assert first != "mixdepth" or "transformers" not in sys.modules, "import mixdepth imported transformers"
from transformers import AutoConfig, AutoModelForCausalLM
assert AutoConfig.for_model("mixdepth").model_type == "mixdepth"
m = AutoModelForCausalLM.from_pretrained(sys.argv[1])
print(type(m).__module__, type(m).__name__)
"""
    for first in ("mixdepth", "transformers", "auto classes"):
        run = _python(code, str(exported[2]), first)
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stdout.split() == ["mixdepth.hf.modeling", "MixdepthForCausalLM"]
    refused = _python(r"""
import sys
from transformers import AutoModelForCausalLM
try:
    AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=False)
except ValueError as e:
    print(str(e).splitlines()[0])
""", str(exported[2]))
    assert refused.returncode == 0 and "custom code" in refused.stdout, refused.stdout + refused.stderr[-2000:]


def test_automodel_save_pretrained_after_remote_code_writes_a_folder_remote_code_loads(exported, tmp_path):
    """A model loaded through remote code (mixdepth not imported first) saves (`save_pretrained`, as
    Trainer and a merged PEFT model do) a folder with the remote-code files its `auto_map` names,
    which a fresh process loads with trust_remote_code=True."""
    save = _python(r"""
import sys
from transformers import AutoModelForCausalLM
AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).save_pretrained(sys.argv[2])
""", str(exported[2]), str(tmp_path / "saved"))
    assert save.returncode == 0, save.stderr[-2000:]
    auto_map = json.loads((tmp_path / "saved" / "config.json").read_text())["auto_map"]
    for name in ("configuration_mixdepth.py", "modeling_mixdepth.py"):
        assert (tmp_path / "saved" / name).read_text() == (exported[2] / name).read_text()
        assert any(v.startswith(name.removesuffix(".py") + ".") for v in auto_map.values())
    load = _python(r"""
import sys
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
print(type(m).__module__, type(m).__name__)
""", str(tmp_path / "saved"))
    assert load.returncode == 0, load.stderr[-2000:]
    assert load.stdout.split() == ["mixdepth.hf.modeling", "MixdepthForCausalLM"]


def test_automodel_refuses_weights_that_do_not_match_the_routing(exported, tmp_path):
    """A folder whose weights lack a router or calibration tensor, or whose config routes other
    layers than the weights: one clear ValueError from `from_pretrained` and from our loader, and
    nothing is written into the folder."""
    import shutil

    from safetensors.torch import load_file, save_file

    out = exported[2]
    cases = {}
    for key in ("model.layers.1.router.weight", "model.layers.3.threshold_table"):
        bad = tmp_path / key.split(".")[-1]
        shutil.copytree(out, bad)
        sd = load_file(str(bad / "model.safetensors"))
        del sd[key]
        save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
        cases[bad] = f"missing weight {key}"
    moved = tmp_path / "routing"
    shutil.copytree(out, moved)
    cfg = json.loads((moved / "config.json").read_text())
    cfg["mixdepth"]["routing"]["route_every"] = 1  # routes layers 0-3, the weights have routers at 1 and 3
    (moved / "config.json").write_text(json.dumps(cfg))
    cases[moved] = "missing weight model.layers.0."
    for folder, msg in cases.items():
        before = sorted(p.name for p in folder.iterdir())
        with pytest.raises(ValueError, match="does not match") as e:
            transformers.AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True)
        assert msg in str(e.value) and "\n" not in str(e.value)
        with pytest.raises(ValueError, match="does not match"):
            load_model(folder)
        assert sorted(p.name for p in folder.iterdir()) == before


def test_automodel_names_both_mixdepth_versions_when_the_installed_one_cannot_read_the_config(exported, tmp_path):
    """config.json records the mixdepth that wrote it; a config the installed mixdepth cannot read
    (a newer one's setting) is one line naming both versions, through transformers and our loader."""
    import shutil

    from mixdepth import __version__

    out = exported[2]
    assert json.loads((out / "config.json").read_text())["mixdepth_version"] == __version__
    newer = tmp_path / "newer"
    shutil.copytree(out, newer)
    cfg = json.loads((newer / "config.json").read_text())
    cfg["mixdepth"]["routing"]["a_newer_setting"] = 1
    cfg["mixdepth_version"] = "99.0"
    (newer / "config.json").write_text(json.dumps(cfg))
    for load in (lambda: transformers.AutoModelForCausalLM.from_pretrained(str(newer), trust_remote_code=True),
                 lambda: load_model(newer)):  # transformers, and generate/eval/train --init
        with pytest.raises(ValueError, match=f"written by mixdepth 99.0, read by the installed {__version__}") as e:
            load()
        assert "a_newer_setting" in str(e.value) and "\n" not in str(e.value)


def test_automodel_export_refuses_what_it_cannot_write_and_leaves_nothing(tmp_path, capsys):
    """`mixdepth export` of a checkpoint whose tokenizer has no Hugging Face form (our BPE), or of a
    model wider than bytes without a tokenizer: one line, exit 2, no --out folder."""
    from mixdepth.cli import main
    from mixdepth.data import BPETokenizer

    model = MoDTransformer(ModelConfig.from_name("debug", vocab_size=300))
    tok = BPETokenizer.train(["to be or not to be, that is the question"] * 20, vocab_size=300)
    ck = save_checkpoint(tmp_path / "bpe", model, tokenizer=tok)
    with pytest.raises(ValueError, match="vocab_size 300 needs its Hugging Face tokenizer"):
        to_transformers(model, tmp_path / "direct")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["export", str(ck), "--out", str(tmp_path / "out" / "hf")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "bpe tokenizer has no Hugging Face form" in err[0], err
    assert not (tmp_path / "out").exists() and not (tmp_path / "direct").exists()


def test_automodel_export_without_transformers_is_one_line(exported, tmp_path, capsys, monkeypatch):
    """`mixdepth export` (format transformers) where transformers is not installed: one line naming
    the extra, exit 2, no --out folder."""
    from mixdepth.cli import main

    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    with pytest.raises(SystemExit) as e:
        main(["export", str(exported[1]), "--out", str(tmp_path / "out" / "hf")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "pip install 'mixdepth[hf]'" in err[0], err
    assert not (tmp_path / "out").exists()


# ---- Trainer, PEFT, lm-eval ----------------------------------------------------------------------
def _pattern_batch(n: int, T: int = 32) -> torch.Tensor:
    """Rows of a repeated short byte pattern: a tiny model learns them in a few steps."""
    rows = []
    for i in range(n):
        unit = list(b"abcdefgh"[: 3 + i % 4])
        rows.append((unit * T)[:T])
    return torch.tensor(rows)


def test_trainer_trains_routers_and_its_checkpoint_reloads(exported, tmp_path):
    """`transformers.Trainer` on a local `datasets.Dataset`: the loss falls, the routers get
    gradients, and the saved checkpoint reloads with the same logits."""
    datasets = pytest.importorskip("datasets")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(exported[2]), trust_remote_code=True)
    x = _pattern_batch(16)
    data = datasets.Dataset.from_dict({"input_ids": x.tolist(), "labels": x.tolist()})
    grads = []
    router = model.model.layers[1].router.weight
    router.register_hook(lambda g: grads.append(float(g.norm())))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=12, per_device_train_batch_size=8, learning_rate=3e-3,
        logging_steps=1, save_steps=12, report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0,
        disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 12 and losses[-1] < 0.8 * losses[0], losses
    assert grads and all(g > 0 for g in grads)
    ckpt = tmp_path / "run" / "checkpoint-12"
    assert (ckpt / "modeling_mixdepth.py").is_file() and (ckpt / "configuration_mixdepth.py").is_file()
    again = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt), trust_remote_code=True).eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x[:2]).logits, model(x[:2]).logits, rtol=0, atol=0)


def test_peft_lora_on_attention_and_mlp_trains_and_merges(exported):
    """PEFT LoRA on q/v and gate/down projections: only the adapters train, the loss falls, and the
    merged model gives the adapted model's logits (and is a `MixdepthForCausalLM` that still routes)."""
    peft = pytest.importorskip("peft")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(exported[2]), trust_remote_code=True)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                             target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])
    lora = peft.get_peft_model(model, config)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("layers.1.self_attn.q_proj" in n for n in trainable)  # a routed layer's block is adapted
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    x = _pattern_batch(8)
    lora.train()
    losses = []
    for _ in range(10):
        loss = lora(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.9 * losses[0], losses
    lora.eval()
    with torch.no_grad():
        adapted = lora(input_ids=x[:2]).logits
        merged = lora.merge_and_unload()
        assert isinstance(merged, MixdepthForCausalLM)
        torch.testing.assert_close(merged(x[:2]).logits, adapted, rtol=1e-4, atol=1e-4)
    assert merged.model.routed_layers


LM_EVAL_TASK = """task: mixdepth_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
"""
LM_EVAL_GEN_TASK = """task: mixdepth_local_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
"""


def test_lm_eval_loglikelihoods_equal_ours(exported, tmp_path):
    """lm-evaluation-harness (`--model hf`, trust_remote_code) on local YAML tasks over a local
    JSONL: it runs, each log-likelihood it reports equals ours computed directly (causal mode), and
    its generation task (batched, left-padded `generate`) gives `mixdepth.generate`'s text."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    docs = [{"question": "To be, or not to", "choices": ["be", "go", "see"], "answer": 0},
            {"question": "ROMEO: What say", "choices": ["you", "thee"], "answer": 1},
            {"question": "Now is the winter", "choices": ["of our", "in a"], "answer": 0}]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "mixdepth_local.yaml").write_text(LM_EVAL_TASK.format(data=data))
    (tmp_path / "tasks" / "mixdepth_local_gen.yaml").write_text(LM_EVAL_GEN_TASK.format(data=data))
    res = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={exported[2]},trust_remote_code=True,dtype=float32",
        tasks=["mixdepth_local", "mixdepth_local_gen"], task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
        batch_size=2, device="cpu", log_samples=True)
    samples = res["samples"]["mixdepth_local"]
    assert len(samples) == len(docs) and "acc,none" in res["results"]["mixdepth_local"]
    model = exported[0]
    checked = 0
    for s in samples:
        assert len(s["arguments"]) == len(s["doc"]["choices"])
        for (context, continuation), resp in zip(s["arguments"], s["resps"]):  # lm-eval's own request text
            ctx, cont = list(context.encode()), list(continuation.encode())
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = model(ids, mode="causal").logits.float().log_softmax(-1)[0]
            ours = sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
            assert abs(float(resp[0][0]) - ours) < 1e-4, (context, continuation, resp, ours)
            checked += 1
    assert checked == 7
    gens = res["samples"]["mixdepth_local_gen"]
    assert len(gens) == len(docs)
    for s in gens:
        context = s["arguments"][0][0]
        new_tokens = generate(model, [list(context.encode())], max_new_tokens=8).run().tokens[0]
        want = bytes(new_tokens).decode("utf-8", errors="replace").split("\n")[0]
        assert s["resps"][0][0] == want, (context, s["resps"], want)


# ---- the real checkpoint (slow) ------------------------------------------------------------------
@pytest.mark.slow
def test_automodel_smollm2_export_answers_the_chat_question_as_mixdepth_generate(tmp_path, capsys):
    """The real SmolLM2 GGUF, converted and exported for transformers, loads through
    `AutoModelForCausalLM`/`AutoTokenizer` from the folder alone and answers the chat question with
    the text `mixdepth generate --chat` prints (uncalibrated routers: every token enters)."""
    pytest.importorskip("gguf")
    from mixdepth.cli import main
    from mixdepth.hf import convert, export
    from test_hf import _smollm2_gguf

    question = "What is the capital of France?"
    ck = convert(_smollm2_gguf(), tmp_path / "smol").out
    out = export(ck, tmp_path / "smol-hf")
    assert main(["generate", "--checkpoint", str(ck), "--chat", "--prompt", question, "--max-new-tokens", "24"]) == 0
    ours = capsys.readouterr().out.split("\n---")[0].strip()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    assert isinstance(model, MixdepthForCausalLM) and model.model.routed_layers
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
    answer = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert ours.startswith(question)  # the CLI prints the prompt, then the reply
    assert answer == ours.removeprefix(question).strip()
    assert "Paris" in answer
