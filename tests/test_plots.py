"""Plots: valid PNGs from saved artefacts, routing maps of a real model, one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")

from mixdepth import MoDTransformer  # noqa: E402
from mixdepth.cli import main  # noqa: E402
from mixdepth.plots import (  # noqa: E402
    load_decisions,
    plot_loss_curves,
    plot_router_stats,
    plot_routing_map,
    read_metrics,
    routing_map_from_model,
    save_decisions,
    token_strings,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHOSEN_RGB = np.array([0x1F, 0x5F, 0xA8]) / 255  # the routing map's colour for "entered the block"


class Bytes:
    """A minimal byte tokenizer, so these tests do not depend on the data module."""

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def read_png(path) -> np.ndarray:
    """Check the PNG signature and read the image back with matplotlib; (H, W, C) floats."""
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] >= 100 and img.shape[1] >= 200, img.shape
    assert img[..., :3].std() > 0.05  # something was drawn, not a blank canvas
    return img


def colour_pixels(img: np.ndarray, rgb, tol: float = 0.02) -> int:
    return int((np.abs(img[..., :3] - np.asarray(rgb)).max(axis=-1) < tol).sum())


def has_colour(img: np.ndarray, rgb, tol: float = 0.02) -> bool:
    return colour_pixels(img, rgb, tol) > 0


def write_run(d, losses, flops_per_step, val_every=2, routed=None):
    d.mkdir(parents=True)
    with open(d / "metrics.jsonl", "w") as f:
        for i, loss in enumerate(losses, 1):
            rec = {"step": i, "tokens": 64 * i, "flops": flops_per_step * i, "loss": loss + 0.01, "lm_loss": loss}
            if routed is not None:
                rec["routed_frac"] = [routed] * 2
                rec["causal_acc"] = [min(1.0, 0.5 + 0.05 * i), min(1.0, 0.6 + 0.04 * i)]
            if i % val_every == 0:
                rec["val_loss"] = loss + 0.1
            f.write(json.dumps(rec) + "\n")
    return d


def test_loss_curves_are_valid_pngs(tmp_path):
    a = write_run(tmp_path / "dense", [5.0, 4.0, 3.5, 3.2, 3.0, 2.9], 1e9)
    b = write_run(tmp_path / "mod", [5.0, 4.2, 3.6, 3.1, 2.9, 2.8, 2.7, 2.6, 2.55, 2.5], 6e8, routed=0.125)
    for x in ("flops", "step", "tokens"):
        out = plot_loss_curves([a, b], tmp_path / f"curves_{x}.png", x=x)
        read_png(out)
    out = plot_loss_curves([a, b], tmp_path / "val.png", key="val_loss", labels=["dense", "MoD"])
    read_png(out)


def test_loss_curves_draw_each_run_in_its_colour(tmp_path):
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgb

    a = write_run(tmp_path / "a", [3.0, 2.0, 1.5], 1.0)
    b = write_run(tmp_path / "b", [3.0, 2.5, 2.0], 1.0)
    second = to_rgb(plt.rcParams["axes.prop_cycle"].by_key()["color"][1])
    assert has_colour(read_png(plot_loss_curves([a, b], tmp_path / "two.png")), second)
    assert not has_colour(read_png(plot_loss_curves([a], tmp_path / "one.png")), second)


def test_missing_or_empty_metrics_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(ValueError, match="no metrics file"):
        plot_loss_curves([tmp_path / "nope"], tmp_path / "x.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty"):
        read_metrics(tmp_path / "empty")
    # the CLI shows it as one line with exit status 2 and writes no file
    with pytest.raises(SystemExit) as e:
        main(["plot", "loss", str(tmp_path / "nope"), "--out", str(tmp_path / "x.png")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no metrics file" in err
    assert not (tmp_path / "x.png").exists()


def test_bad_metrics_and_arguments(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    # a half-written last line (run killed mid-write) is skipped; a bad middle line is an error
    (d / "metrics.jsonl").write_text('{"step": 1, "flops": 1, "lm_loss": 2.0}\n{"step": 2, "fl')
    assert len(read_metrics(d)) == 1
    (d / "metrics.jsonl").write_text('{"step": 1, "fl\n{"step": 2, "flops": 2, "lm_loss": 2.0}\n')
    with pytest.raises(ValueError, match="line 1"):
        read_metrics(d)
    (d / "metrics.jsonl").write_text('{"step": 1, "flops": 1, "lm_loss": 2.0}\n')
    with pytest.raises(ValueError, match="x must be"):
        plot_loss_curves([d], tmp_path / "x.png", x="time")
    with pytest.raises(ValueError, match="no val_loss"):
        plot_loss_curves([d], tmp_path / "x.png", key="val_loss")
    with pytest.raises(ValueError, match=r"\.png"):
        plot_loss_curves([d], tmp_path / "x.jpg")


def test_router_stats(tmp_path):
    d = write_run(tmp_path / "mod", [4.0, 3.0, 2.5, 2.2], 1e6, val_every=1, routed=0.125)
    read_png(plot_router_stats(d, tmp_path / "stats.png"))
    dense = write_run(tmp_path / "dense", [4.0, 3.0], 1e6)
    with pytest.raises(ValueError, match="no routed_frac"):
        plot_router_stats(dense, tmp_path / "stats2.png")


@pytest.mark.parametrize("mode", ["topk", "causal"])
def test_routing_map_from_debug_model(tmp_path, debug_cfg, mode):
    cfg = debug_cfg(capacity=0.25)
    model = MoDTransformer(cfg)
    text = "To be, or not to be: that is the question."
    decisions, tokens, layer_ids = routing_map_from_model(model, Bytes(), text, mode=mode)
    T = len(text.encode())
    assert layer_ids == cfg.routed_layer_ids and decisions.shape == (len(layer_ids), T)
    assert decisions.dtype == bool and "".join(tokens) == text
    # the map is what the model did: compare with a direct forward pass
    with torch.no_grad():
        out = model(torch.tensor([list(text.encode())]), mode=mode, return_routing=True)
    for row, i in zip(decisions, layer_ids):
        assert np.array_equal(row, out.routing[i][0].numpy())
    if mode == "topk":
        assert (decisions.sum(1) == cfg.routing.k(T)).all()
    read_png(plot_routing_map(decisions, tokens, tmp_path / f"map_{mode}.png", layer_ids=layer_ids))


def test_routing_map_colours_follow_decisions(tmp_path):
    # the legend shows the "chosen" colour too, so compare pixel counts: more chosen cells, more pixels
    none = np.zeros((2, 20), dtype=bool)
    one, many = none.copy(), none.copy()
    one[1, 3] = True
    many[:, ::2] = True
    tokens = list("abcdefghijklmnopqrst")
    counts = [colour_pixels(read_png(plot_routing_map(d, tokens, tmp_path / f"{i}.png")), CHOSEN_RGB)
              for i, d in enumerate((none, one, many))]
    assert counts[0] < counts[1] < counts[2], counts
    # a cell is about (figure width / 20) pixels wide: twenty chosen cells add far more than one
    assert counts[2] - counts[0] > 10 * (counts[1] - counts[0]), counts
    some = one
    with pytest.raises(ValueError, match="token strings"):
        plot_routing_map(some, ["a"], tmp_path / "c.png")
    # long sequences fall back to position ticks
    read_png(plot_routing_map(np.random.default_rng(0).random((3, 400)) < 0.125, None, tmp_path / "long.png"))


def test_routing_map_of_dense_model_is_refused(debug_cfg):
    model = MoDTransformer(debug_cfg(router="none"))
    with pytest.raises(ValueError, match="no routed layers"):
        routing_map_from_model(model, Bytes(), "hello")


def test_decisions_round_trip_and_cli(tmp_path, capsys):
    d = np.random.default_rng(1).random((2, 12)) < 0.3
    path = save_decisions(tmp_path / "dec.npz", d, list("hello world!"), [1, 3])
    d2, tokens, ids = load_decisions(path)
    assert np.array_equal(d, d2) and tokens == list("hello world!") and ids == [1, 3]
    assert main(["plot", "routing", "--decisions", str(path), "--out", str(tmp_path / "m.png")]) == 0
    read_png(tmp_path / "m.png")
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["plot", "routing", "--decisions", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "n.png")])
    assert e.value.code == 2


def test_cli_loss_and_stats(tmp_path):
    a = write_run(tmp_path / "a", [3.0, 2.0, 1.5, 1.2], 10.0, routed=0.125)
    b = write_run(tmp_path / "b", [3.0, 2.5, 2.0, 1.9], 20.0)
    assert main(["plot", "loss", str(a), str(b), "--out", str(tmp_path / "c.png"), "--x", "flops"]) == 0
    read_png(tmp_path / "c.png")
    assert main(["plot", "stats", str(a), "--out", str(tmp_path / "s.png")]) == 0
    read_png(tmp_path / "s.png")


def test_token_strings_show_bytes_and_control_characters_as_ids():
    """One label rule for `plot routing` and `generate --routing-map`: text where a token has its own
    printable text, else its id (hex for a byte-level tokenizer)."""
    from mixdepth.data import ByteTokenizer

    tok = ByteTokenizer()
    assert token_strings(tok, tok.encode("é\x01a \n")) == ["<c3>", "<a9>", "<01>", "a", " ", "\n"]

    class Words:
        vocab = {0: "hi", 1: "\x07", 2: "\ufffd"}

        def decode(self, ids):
            if ids[0] not in self.vocab:
                raise KeyError(ids[0])
            return self.vocab[ids[0]]

    assert token_strings(Words(), [0, 1, 2, 300]) == ["hi", "<1>", "<2>", "<300>"]


def test_loss_curves_of_a_named_auxiliary_loss(tmp_path):
    """A loss a router logs by name is plotted by name; a key that names no loss is refused."""
    d = tmp_path / "run"
    d.mkdir()
    (d / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "tokens": i, "flops": i, "lm_loss": 3.0,
                                                         "balance_loss": 1.0 + 0.1 * i}) + "\n" for i in range(1, 5)))
    assert plot_loss_curves([d], tmp_path / "b.png", x="step", key="balance_loss").exists()
    with pytest.raises(ValueError, match="no z_loss"):
        plot_loss_curves([d], tmp_path / "z.png", key="z_loss")
    with pytest.raises(ValueError, match="key must name a logged loss"):
        plot_loss_curves([d], tmp_path / "g.png", key="grad_norm")
