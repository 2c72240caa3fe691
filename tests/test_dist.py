"""torchrun on CPU (gloo): DDP and FSDP2 train as one process does, checkpoints move between world
sizes, and FSDP never hangs when ranks route differently.

These start 2-process torchrun jobs yet are not marked `slow`: they run in the default suite (`make
test`, so in CI), about 80 s on 2 cores; pyproject's `slow` marker says so."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mixdepth.train import TrainConfig, run_train

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
SENTENCES = ["The quality of mercy is not strained; it droppeth as the gentle rain from heaven.",
             "All the world's a stage, and all the men and women merely players.",
             "Now is the winter of our discontent made glorious summer by this sun of York."]
STEPS = 6


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(f"{i}. {SENTENCES[(i * 7) % 3]}" for i in range(400)) + "\n")
    return path


def _args(corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["--preset", "debug", "--train.data", str(corpus), "--train.seq_len", "32", "--train.batch_size", "2",
            "--train.grad_accum", "2", "--train.max_steps", str(STEPS), "--train.log_every", "1",
            "--train.eval_every", "3", "--train.ckpt_every", "3", "--train.keep_last", "0", "--train.eval_batches",
            "2", "--train.warmup_steps", "2", "--device", "cpu", "--no-progress", "--out", str(out), *extra]


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MIXDEPTH_CACHE": str(tmp_path / "cache"),
            "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}


def _torchrun(tmp_path: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([*TORCHRUN, "-m", "mixdepth", *args], env=_env(tmp_path), capture_output=True, text=True,
                       timeout=240)
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def _single(corpus: Path, out: Path, tmp_path: Path, *extra: str) -> None:
    p = subprocess.run([sys.executable, "-m", "mixdepth", "train", *_args(corpus, out, *extra)], env=_env(tmp_path),
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]


def _losses(run: Path, key: str = "lm_loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in r}


def _cut(run: Path, to: Path, step: int) -> Path:
    """A copy of `run` as if it had been killed right after the checkpoint of `step`."""
    shutil.copytree(run, to)
    for ckpt in (to / "checkpoints").iterdir():
        if int(ckpt.name.split("-")[1]) > step:
            shutil.rmtree(ckpt)
    (to / "latest").write_text(f"checkpoints/step-{step:06d}\n")
    return to


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """The single-process run every distributed run is compared with (global batch 2 x 2 x 32 tokens)."""
    tmp = tmp_path_factory.mktemp("ref")
    _single(corpus, tmp / "single", tmp)
    return tmp / "single"


@pytest.mark.parametrize("mode, rel, extra", [("ddp", 1e-5, []), ("fsdp", 1e-4, []),
                                              ("fsdp", 1e-4, ["--train.activation_checkpointing", "true"])])
def test_two_ranks_follow_the_single_process_curve(tmp_path, corpus, reference, mode, rel, extra):
    out = tmp_path / mode
    p = _torchrun(tmp_path, "train", *_args(corpus, out, "--train.dist", mode, *extra))
    ref, got = _losses(reference), _losses(out)
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=rel), step
    for key in ("grad_norm", "val_loss"):
        a, b = _losses(reference, key), _losses(out, key)
        assert a.keys() == b.keys() and all(b[s] == pytest.approx(a[s], rel=max(rel, 1e-4)) for s in a), key
    # only rank 0 wrote: one metrics line per step, one final report
    assert p.stdout.count("run ") == 1
    # the checkpoint is the usual full safetensors folder: it loads in one process as any other, and
    # holds the single process's weights to far less than one AdamW step (lr 1e-3): a gradient scaled
    # by the world size, clipped or reduced differently moves them by about that much (measured here:
    # DDP equal, FSDP within 6e-8)
    from mixdepth.checkpoint import load_model

    model = load_model(out)
    ref_model = load_model(reference)
    import torch

    got = model.state_dict()
    assert got.keys() == ref_model.state_dict().keys()
    for n, a in ref_model.state_dict().items():
        torch.testing.assert_close(got[n], a, atol=1e-6, rtol=0, msg=n)
    halfway = load_model(reference / "checkpoints" / "step-000003").state_dict()
    moved = max(float((a - halfway[n]).abs().max()) for n, a in ref_model.state_dict().items())
    assert moved > 1e-4  # three steps move the weights far beyond that tolerance


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_checkpoints_move_between_world_sizes(tmp_path, corpus, reference, mode):
    """A 2-rank checkpoint resumes in 1 process, and a 1-process checkpoint in 2 ranks; both continue as
    the uninterrupted run."""
    ref = _losses(reference)
    two = tmp_path / "two"
    _torchrun(tmp_path, "train", *_args(corpus, two, "--train.dist", mode))
    to_one = _cut(two, tmp_path / "to-one", 3)
    _single(corpus, to_one, tmp_path, "--resume")
    to_two = _cut(reference, tmp_path / "to-two", 3)
    _torchrun(tmp_path, "train", *_args(corpus, to_two, "--train.dist", mode, "--resume"))
    for run in (to_one, to_two):
        got = _losses(run)
        assert sorted(got) == list(range(1, STEPS + 1))
        for step in range(4, STEPS + 1):
            assert got[step] == pytest.approx(ref[step], rel=1e-4), (run.name, step)


def test_a_failing_rank_ends_the_run_with_its_one_line_error(tmp_path, corpus):
    p = _torchrun(tmp_path, "train", *_args(corpus, tmp_path / "bad", "--train.grad_accum", "3"), check=False)
    assert p.returncode != 0
    lines = [line for line in p.stderr.splitlines() if "must be a multiple of the world size" in line]
    assert lines and lines[0].startswith("mixdepth train: error: rank ")
    # the ranks' own output holds no traceback (torchrun's summary of the failed ranks follows it)
    assert "Traceback" not in p.stderr.split(lines[0])[0]


CAUSAL_EVAL = textwrap.dedent('''
    import torch, torch.distributed as dist
    from mixdepth.config import ModelConfig
    from mixdepth.distributed import apply_fsdp, init_from_env
    from mixdepth.model import MoDTransformer

    d = init_from_env(torch.device("cpu"))
    torch.manual_seed(0)
    model = MoDTransformer(ModelConfig.from_name("debug", n_layers=6, routing=dict(route_every=2)))
    reference = MoDTransformer(model.cfg)
    reference.load_state_dict(model.state_dict())
    apply_fsdp(model)
    model.eval()
    ids = model.cfg.routed_layer_ids
    # rank 0: no token enters any routed layer; rank 1: every token enters every one
    th = {i: (float("inf") if d.rank == 0 else -float("inf")) for i in ids}
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(d.rank))
    with torch.no_grad():
        for _ in range(3):
            out = model(x, mode="causal", thresholds=th)
            cache = model.make_cache(2, 32)
            model(x, mode="causal", thresholds=th, cache=cache)
            step = model(x[:, -1:], mode="causal", thresholds=th, cache=cache)
        ref = reference(x, mode="causal", thresholds=th)
        ref_cache = reference.make_cache(2, 32)
        reference(x, mode="causal", thresholds=th, cache=ref_cache)
        ref_step = reference(x[:, -1:], mode="causal", thresholds=th, cache=ref_cache)
        longer = reference(torch.cat([x, x[:, -1:]], 1), mode="causal", thresholds=th)
    frac = out.routed_frac.mean().item()
    assert frac == (0.0 if d.rank == 0 else 1.0), frac
    assert torch.allclose(out.logits, ref.logits, atol=1e-5)
    # the cached decode step under FSDP: the unsharded model's step, and its full forward's last position
    assert step.logits.shape == (2, 1, 256)
    torch.testing.assert_close(step.logits, ref_step.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(step.logits, longer.logits[:, -1:], atol=1e-5, rtol=0)
    assert [int(cache.layers[i].lengths.max()) for i in ids] == [0 if d.rank == 0 else 25] * len(ids)
    dist.barrier()
    print(f"rank {d.rank} finished, routed {frac}")
    dist.destroy_process_group()
''')


def test_causal_eval_under_fsdp_with_rank_dependent_routing_finishes(tmp_path):
    script = tmp_path / "causal_eval.py"
    script.write_text(CAUSAL_EVAL)
    p = subprocess.run([*TORCHRUN, str(script)], env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "rank 0 finished, routed 0.0" in p.stdout and "rank 1 finished, routed 1.0" in p.stdout


def test_model_code_never_imports_torch_distributed():
    src = Path(__file__).parents[1] / "src" / "mixdepth" / "model"
    import ast

    for f in src.glob("*.py"):
        tree = ast.parse(f.read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        uses = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "distributed"]
        assert not [m for m in names if m.startswith("torch.distributed")] and not uses, f


def test_single_process_config_checks(tmp_path, corpus):
    for kw, msg in ((dict(dist="ring"), "train.dist must be one of"),):
        with pytest.raises(ValueError, match=msg):
            TrainConfig(data=str(corpus), **kw)
    with pytest.raises(ValueError, match="apply with train.dist fsdp"):
        run_train(TrainConfig(data=str(corpus), seq_len=32, max_steps=1, activation_checkpointing=True,
                              out_dir=str(tmp_path / "ac"), cache_dir=str(tmp_path / "cache"), device="cpu"))
