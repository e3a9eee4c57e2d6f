"""Fast checks of the quality benchmark: world, detectors, metrics, and the pipeline end to end."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from quality import metrics as M
from quality.world import (BACKGROUNDS, COLOURS, SHAPES, STYLES, WORDS, Detection, caption,
                           caption_from, combo_key, detect, random_scene, render)


def _scenes(seed: int, n: int):
    rng = random.Random(seed)
    return [random_scene(rng, shapes=SHAPES, colours=COLOURS) for _ in range(n)]


def test_world_is_deterministic_from_its_seed():
    a, b = _scenes(3, 20), _scenes(3, 20)
    assert a == b
    assert all(np.array_equal(render(x), render(y)) for x, y in zip(a, b))
    assert [caption(s) for s in a] == [caption(s) for s in b]
    assert _scenes(4, 20) != a


@pytest.mark.parametrize("size", [64, 128])
def test_detectors_recover_the_ground_truth_exactly_on_rendered_images(size):
    for s in _scenes(11, 250):
        d = detect(render(s, size))
        assert d.present
        assert (d.shape, d.colour, d.style, d.background, d.position, d.size_name) == combo_key(s), s
        left = round(s.cx * size - round(s.size * size) / 2)
        assert d.cx == pytest.approx((left + round(s.size * size) / 2) / size, abs=1.01 / size)
        assert d.size == pytest.approx(s.size, abs=1.01 / size)


@pytest.mark.parametrize("size", [64, 128])
def test_shape_detection_with_rotation_reads_turned_shapes_and_keeps_the_diamond(size):
    from scipy import ndimage

    for shape in SHAPES:
        img = render(random_scene(random.Random(1), shape=shape, colour="blue", style="flat",
                                  size_name="large", background="white", position="centre"), size)
        for angle in (-15, -10, 10, 15):
            turned = ndimage.rotate(img, angle, reshape=False, order=0, mode="nearest")
            assert detect(turned, rotation_deg=15).shape == shape, (shape, angle)
        assert detect(img, rotation_deg=15).shape == shape
    # why the option exists: box-normalised, a cross turned by 15 degrees reads as a diamond
    cross = render(random_scene(random.Random(1), shape="cross", colour="blue", style="flat",
                                size_name="large", background="white", position="centre"), size)
    assert detect(ndimage.rotate(cross, 15, reshape=False, order=0, mode="nearest")).shape == "diamond"


def test_every_combination_of_shape_colour_style_is_read_back():
    for shape in SHAPES:
        for colour in COLOURS:
            for style in STYLES:
                for size_name in ("small", "large"):
                    s = random_scene(random.Random(0), shape=shape, colour=colour, style=style,
                                     size_name=size_name, background="grey", position="centre")
                    d = detect(render(s))
                    assert (d.shape, d.colour, d.style, d.size_name) == (shape, colour, style, size_name)


def test_empty_background_is_detected_as_absent_object():
    for name, rgb in BACKGROUNDS.items():
        img = np.empty((64, 64, 3), np.uint8)
        img[:] = rgb
        d = detect(img)
        assert d.background == name and not d.present


def test_captions_and_tokenizer_know_every_word():
    from quality.models import build_tokenizers

    assert caption_from({"colour": "red", "shape": "circle", "size_name": "small", "position": "top left",
                         "background": "sky", "style": "flat"}) == \
        "a red circle, small, top left, on a sky background, flat style"
    assert caption_from({"background": "pink", "position": "centre"}, token="sks") == \
        "a sks shape, in the centre, on a pink background"
    tok_1, tok_2 = build_tokenizers()
    for w in WORDS:
        assert len(tok_1.tokenize(w)) == 1 and len(tok_2.tokenize(w)) == 1, w


def _det(**kw) -> Detection:
    base = dict(background="white", present=True, shape="cross", colour="teal", style="flat",
                position="centre", size_name="large", cx=0.5, cy=0.5, size=0.5)
    base.update(kw)
    return Detection(**base)


def test_metrics_on_hand_made_cases():
    dets = [_det(), _det(colour="red"), _det(shape="circle"), _det(present=False, shape=None, colour=None)]
    assert M.identity(dets, "cross", "teal") == 0.25
    loose = dets + [_det(shape="diamond"), _det(shape="diamond", colour="red")]
    assert M.identity_any(loose, ("cross", "diamond"), "teal") == pytest.approx(2 / 6)
    assert math.isnan(M.identity_any([], ("cross",), "teal"))
    req = [{"background": "white", "style": "flat"}, {"background": "pink", "style": "flat"},
           {"background": "white"}, {"background": "white", "style": "striped"}]
    # hits: (T, T), (F, T), (T), (T [absent object still has a background], F) -> 5 of 7
    assert M.attribute_match(dets, req, M.CONTEXT_ATTRS) == pytest.approx(5 / 7)
    assert math.isnan(M.attribute_match(dets, [{}] * 4, M.LAYOUT_ATTRS))
    moved = [_det(cx=0.8, cy=0.9, size=0.25), _det(cx=0.5, cy=0.5, size=1.0), _det(present=False)]
    pos, scale = M.spreads(moved, 0.5, 0.5, 0.5)
    assert pos == pytest.approx(math.sqrt((0.3 ** 2 + 0.4 ** 2) / 2))  # distances 0.5 and 0
    assert scale == pytest.approx(1.0)  # log2 ratios -1 and +1
    assert all(math.isnan(v) for v in M.spreads([_det(present=False)], 0.5, 0.5, 0.5))
    a = np.zeros((2, 4, 4, 3), np.uint8)
    b = a.copy()
    b[0] = 255
    assert M.drift_px(a, b) == pytest.approx(0.5)
    assert M.drift_attr([_det(), _det()], [_det(), _det(colour="red", position="top left")]) == pytest.approx(2 / 14)
    assert M.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert M.mean_std([4.0]) == (4.0, 0.0)


def test_sampler_is_deterministic_per_seed_and_independent_of_batching():
    from quality.models import build_world_sdxl
    from quality.sampling import sample

    c = build_world_sdxl(0)
    prompts = ["a red circle, small, top left", "a sks shape, on a pink background", ""]
    one = sample(c, prompts, [5, 6, 7], steps=2, batch=3)
    two = sample(c, prompts[1:], [6, 7], steps=2, batch=1)
    assert one.shape == (3, 64, 64, 3) and one.dtype == np.uint8
    np.testing.assert_array_equal(one, sample(c, prompts, [5, 6, 7], steps=2, batch=3))
    # another batch split changes only float rounding (batched matmuls), never the picture
    assert np.abs(one[1:].astype(int) - two.astype(int)).max() <= 2


def test_background_fill_shift_is_exact():
    """The pixel shift that makes apt_core's black fill mean "reference background" is exact."""
    from apt_core.augment import zoom_rotate
    from apt_core.conditioning import CachedDataset, CachedExample
    from quality.bench import _background_fill
    from quality.task import to_pixels

    s = random_scene(random.Random(1), background="sand", size_name="large", position="centre")
    px = to_pixels(render(s))
    ex = CachedExample(torch.zeros(4, 8, 8), None, "", pixels=px.clone())  # type: ignore[arg-type]
    to_real = _background_fill(CachedDataset([ex]), BACKGROUNDS["sand"])
    zoom, angle = torch.tensor([2.5]), torch.tensor([10.0])
    shifted = to_real(zoom_rotate(ex.pixels[None], zoom, angle, "constant", -1.0))
    bg = torch.tensor(BACKGROUNDS["sand"], dtype=torch.float32).view(1, 3, 1, 1) / 127.5 - 1
    direct = zoom_rotate(px[None] - bg, zoom, angle, "constant", 0.0) + bg
    torch.testing.assert_close(shifted, direct, atol=1e-5, rtol=0)
    assert torch.allclose(shifted[0, :, 0, 0], bg.view(3), atol=1e-5)  # a corner is background now


def test_quick_benchmark_runs_end_to_end_on_an_untrained_prior(tmp_path):
    from quality.run import main

    assert main(["--quick", "--untrained-prior", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res["runs"]) == {"baseline", "apt"}
    for runs in res["runs"].values():
        assert [e["step"] for e in runs[0]["evals"]] == [2, 4]
        assert len(runs[0]["history"]) == 4 and len(runs[0]["final_gamma"]) == 10
    assert "| DreamBooth-LoRA |" in (tmp_path / "report.md").read_text()
    before = (tmp_path / "report.md").read_text()
    assert main(["--replot", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "report.md").read_text() == before
    from PIL import Image

    assert Image.open(tmp_path / "figure.png").size[0] > 300
    assert set(res["identity_ceiling"]) == {"identity", "identity_loose"}
    assert "identity_loose" in runs[0]["evals"][0] and "ref_identity_loose" in runs[0]["evals"][0]
    # --merge: two runs of the same config with other seeds make one report over both seeds
    other = tmp_path / "other"
    other.mkdir()
    r2 = json.loads(json.dumps(res))
    r2["config"]["seeds"] = [5]
    for runs in r2["runs"].values():
        runs[0]["seed"] = 5
    (other / "results.json").write_text(json.dumps(r2))
    merged = tmp_path / "merged"
    assert main(["--merge", str(tmp_path), str(other), "--out", str(merged)]) == 0
    m = json.loads((merged / "results.json").read_text())
    assert m["config"]["seeds"] == [0, 5] and [r["seed"] for r in m["runs"]["apt"]] == [0, 5]
    assert "the longest of 2 processes merged" in (merged / "report.md").read_text()
    # ... and runs of other methods (one process per method and seed) join the same report
    third = tmp_path / "third"
    third.mkdir()
    r3 = json.loads(json.dumps(r2))
    r3["config"]["methods"], r3["runs"] = ["baseline"], {"baseline": r3["runs"]["baseline"]}
    r3["runs"]["baseline"][0]["seed"], r3["config"]["seeds"] = 3, [3]
    (third / "results.json").write_text(json.dumps(r3))
    assert main(["--merge", str(other), str(third), str(tmp_path), "--out", str(merged)]) == 0
    m = json.loads((merged / "results.json").read_text())
    assert list(m["runs"]) == ["baseline", "apt"] and m["config"]["seeds"] == [0, 3, 5]
    assert [r["seed"] for r in m["runs"]["baseline"]] == [0, 3, 5] and [r["seed"] for r in m["runs"]["apt"]] == [0, 5]
    with pytest.raises(SystemExit, match="twice"):
        main(["--merge", str(tmp_path), str(other), str(other), "--out", str(merged)])
    r2["config"]["eval"]["guidance"] = 1.0
    (other / "results.json").write_text(json.dumps(r2))
    with pytest.raises(SystemExit, match="differs"):
        main(["--merge", str(tmp_path), str(other), "--out", str(merged)])


def test_train_prior_quick_writes_a_loadable_fp16_sdxl_folder(tmp_path):
    from apt_core.models import check_sdxl_unet, load_sdxl
    from quality.train_prior import main

    assert main(["--quick", "--out", str(tmp_path / "prior"), "--unet-steps", "2", "--vae-steps", "2",
                 "--vae-full-steps", "1", "--n-train", "8", "--eval-prompts", "2"]) == 0
    from safetensors import safe_open

    with safe_open(str(tmp_path / "prior" / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16
    c = load_sdxl(tmp_path / "prior")
    check_sdxl_unet(c.unet)
    assert c.vae.config.scaling_factor != 1.0
    assert json.loads((tmp_path / "prior" / "prompt_following.json").read_text())["n"] == 2


def test_train_prior_at_128_px_reusing_a_vae(tmp_path):
    from apt_core.models import load_sdxl
    from quality.models import world_image_size
    from quality.train_prior import main

    quick = ["--quick", "--unet-steps", "2", "--vae-steps", "2", "--vae-full-steps", "1", "--n-train", "8",
             "--eval-prompts", "2"]
    assert main(quick + ["--out", str(tmp_path / "p64")]) == 0
    assert main(quick + ["--out", str(tmp_path / "p128"), "--size", "128", "--vae-from", str(tmp_path / "p64")]) == 0
    p64, p128 = load_sdxl(tmp_path / "p64"), load_sdxl(tmp_path / "p128")
    assert (world_image_size(p64), world_image_size(p128)) == (64, 128)
    assert p128.vae.config.scaling_factor == p64.vae.config.scaling_factor
    for k, v in p64.vae.state_dict().items():
        assert torch.equal(v, p128.vae.state_dict()[k]), k
    assert json.loads((tmp_path / "p128" / "prompt_following.json").read_text())["size"] == 128
    # continuing a prior with offset noise: the VAE is kept, the UNet moves on from where it was
    assert main(quick + ["--out", str(tmp_path / "p128c"), "--size", "128", "--init-from", str(tmp_path / "p128"),
                         "--noise-offset", "0.1"]) == 0
    p128c = load_sdxl(tmp_path / "p128c")
    for k, v in p128.vae.state_dict().items():
        assert torch.equal(v, p128c.vae.state_dict()[k]), k
    before, after = p128.unet.state_dict(), p128c.unet.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert max((before[k].float() - after[k].float()).abs().max().item() for k in before) < 0.05  # 2 steps
    res = json.loads((tmp_path / "p128c" / "prompt_following.json").read_text())
    assert res["init_from"] == str(tmp_path / "p128") and res["settings"]["noise_offset"] == 0.1
    assert 0.0 <= res["background_from_noise"]["r2"] <= 1.0
    with pytest.raises(SystemExit, match="128 px prior"):
        main(quick + ["--out", str(tmp_path / "bad"), "--init-from", str(tmp_path / "p128")])


def test_r_squared_and_border_colour_on_hand_made_cases():
    from quality.train_prior import r_squared
    from quality.world import border_rgb

    x = np.array([[0.0], [1.0], [2.0], [3.0]])
    assert r_squared(x, 2 * x + 1) == pytest.approx([1.0])
    # slope 0.8 = cov / var = 4 / 5; R^2 = cov^2 / (var_x var_y) = 16 / 25
    assert r_squared(x, np.array([[1.0], [3.0], [2.0], [4.0]])) == pytest.approx([0.64])
    img = np.zeros((16, 16, 3), np.uint8)
    img[:] = (10, 20, 30)
    img[2:-2, 2:-2] = (200, 0, 0)
    img[0, 0] = (255, 255, 255)  # one odd pixel does not move the median
    assert border_rgb(img).tolist() == [10.0, 20.0, 30.0]


def test_offset_noise_adds_a_per_channel_constant_of_the_given_spread():
    from quality.train_prior import training_noise

    g = torch.Generator().manual_seed(0)
    plain = training_noise((4000, 4, 16, 16), 0.0, g)
    offset = training_noise((4000, 4, 16, 16), 0.1, g)
    # variance of a channel's spatial mean: 1 / 256 without, 1 / 256 + 0.01 with the offset
    assert plain.mean(dim=(2, 3)).var().item() == pytest.approx(1 / 256, rel=0.05)
    assert offset.mean(dim=(2, 3)).var().item() == pytest.approx(1 / 256 + 0.01, rel=0.05)
    assert torch.equal(training_noise((2, 4, 8, 8), 0.0, torch.Generator().manual_seed(1)),
                       torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(1)))


def test_diagnose_command_writes_its_json_and_figure(tmp_path):
    from quality.diagnose import main

    assert main(["--config", "quality/configs/world128c.json", "--method", "ata", "--steps", "1",
                 "--samples", "2", "--set", '{"augment": {"zoom_max": 2.0}}', "--out", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "diagnosis.json").read_text())
    assert out["image_size"] == 128 and out["steps"] == 1 and len(out["ref_caption_detections"]) == 2
    assert len(out["bin_loss_ft"]) == len(out["bin_loss_pre"]) == 10
    assert out["overrides"] == {"augment": {"zoom_max": 2.0}}
    assert (tmp_path / "diagnosis.png").stat().st_size > 0


def test_reg_gradient_draws_cover_every_bin_and_both_terms_start_at_exactly_zero(tmp_path):
    from quality.reg_gradient import fixed_draws, main

    draws = fixed_draws(3, (4, 8, 8), per_bin=2)
    assert [int(t) // 100 for _, t, _ in draws] == [b for b in range(10) for _ in range(2)]
    assert [i for i, _, _ in draws[:4]] == [0, 1, 0, 1]

    assert main(["--config", "quality/configs/world128c.json", "--method", "apt", "--at", "0,3",
                 "--per-bin", "1", "--set", '{"train": {"learning_rate": 0.01}}', "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "reg_gradient.json").read_text())["rows"]
    assert [r["step"] for r in rows] == [0, 3]
    # the LoRA starts as a no-op: the fine-tuned features and attention are the prior's, RS, AA and
    # RS's gradient are 0 (AA's is 0 up to rounding: KL is at its minimum)
    first, later = rows
    assert first["rs_value"] == 0.0 and first["rs_norm"] == 0.0 and first["disp_norm"] == 0.0
    assert first["aa_value"] == 0.0 and first["aa_norm"] < 1e-6 * first["dn_norm"]
    assert first["ft_value"] == pytest.approx(first["pre_value"])
    assert [t["prior"] for t in first["tokens"]] == [t["ft"] for t in first["tokens"]]
    assert later["rs_value"] > 0 and later["rs_norm"] > 0 and later["disp_norm"] > 0
    assert later["aa_value"] > 0 and later["aa_norm"] > 0
    assert len(later["bins"]) == 10 and -1.0 <= later["cos_dn_rs"] <= 1.0 and -1.0 <= later["cos_dn_aa"] <= 1.0
    tokens = [t["token"] for t in later["tokens"]]
    assert tokens[0] == "<|startoftext|>" and tokens[-1] == "<|endoftext|>" and "sks</w>" in tokens
    # each token's share of AA adds up to the (mean over draws of the) term itself
    assert sum(t["share"] for t in later["tokens"]) == pytest.approx(later["aa_value"], rel=1e-4)


def test_token_aa_shares_add_up_to_the_aa_term():
    from apt_core.regularizers import aa_layer_loss
    from quality.reg_gradient import token_aa_shares

    g = torch.Generator().manual_seed(0)
    prior = torch.randn(2, 3, 5, 7, generator=g).softmax(-1)
    ft = torch.randn(2, 3, 5, 7, generator=g).softmax(-1)
    mask = torch.tensor([[True] * 4 + [False] * 3, [True] * 6 + [False]])
    for distance in ("kl", "mse"):
        shares = token_aa_shares(prior, ft, mask, distance)
        assert shares.shape == (7,) and float(shares[6]) == 0.0
        torch.testing.assert_close(shares.sum(), aa_layer_loss(ft, prior, mask, distance))
    # by hand for one query: p, r renormalised over the 4 valid tokens
    p, r = prior[0, 0, 0, :4] / prior[0, 0, 0, :4].sum(), ft[0, 0, 0, :4] / ft[0, 0, 0, :4].sum()
    one = token_aa_shares(prior[:1, :1, :1], ft[:1, :1, :1], mask[:1])
    torch.testing.assert_close(one[:4], p * (p.log() - r.log()), atol=1e-6, rtol=1e-5)


def test_sweep_table_averages_over_steps_and_pairs_seeds(tmp_path):
    from quality.sweep import main

    def report(name, curves):
        d = tmp_path / name
        d.mkdir()
        runs = [{"seed": s, "evals": [{"step": 500, "ref_identity": a}, {"step": 1000, "ref_identity": b}]}
                for s, (a, b) in curves.items()]
        (d / "results.json").write_text(json.dumps({"runs": {"m": runs}, "prior": {"ref_identity": 0.125}}))
        return d

    base = report("base", {0: (0.2, 0.4), 1: (0.0, 0.6), 2: (0.5, 0.5)})
    other = report("other", {1: (0.0, 0.2), 2: (0.5, 0.7)})
    out = tmp_path / "t.md"
    assert main(["--row", f"A={base}:m", "--row", f"B={other}:m", "--out", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| A") or line.startswith("| B")]
    # A: over steps 0.3 / 0.3 / 0.5 -> mean 0.367, std 0.115; final 0.4 / 0.6 / 0.5 -> 0.5 ± 0.1;
    # swings 0.2 / 0.6 / 0 -> 0.267
    assert rows[0] == "| A | 0,1,2 | 0.500 ± 0.100 | 0.267 | 0.367 ± 0.115 | 0.30 / 0.30 / 0.50 | — |"
    # B: seed 1 0.1 (-0.2 vs A), seed 2 0.6 (+0.1) -> paired mean -0.05, one of two lower; swings 0.2, 0.2
    assert rows[1] == "| B | 1,2 | 0.450 ± 0.354 | 0.200 | 0.350 ± 0.354 | 0.10 / 0.60 | -0.050 (1 of 2 lower) |"

    assert main(["--row", f"A={base}:m", "--row", f"B={other}:m", "--overview", "--out", str(out)]) == 0
    text = out.read_text()
    final, over = text.split("averaged over")
    assert "| prior (no LoRA) | — | 0.125 |" in final and "| prior (no LoRA) | — | 0.125 |" in over
    assert "| A | 0,1,2 | 0.500 ± 0.100 |" in final and "| B | 1,2 | 0.450 ± 0.354 |" in final
    assert "| A | 0,1,2 | 0.367 ± 0.115 |" in over and "| B | 1,2 | 0.350 ± 0.354 |" in over


@pytest.mark.parametrize("config, size", [("world128c.json", 128), ("world128c_lr2e3.json", 128)])
def test_demo_data_writes_the_references_at_the_prior_s_size_with_their_caption(tmp_path, config, size):
    from PIL import Image

    from quality.demo_data import write_demo_data

    photos = write_demo_data(tmp_path, f"quality/configs/{config}")
    pngs = sorted(photos.glob("*.png"))
    assert len(pngs) == 4
    for png in pngs:
        img = np.asarray(Image.open(png).convert("RGB"))
        assert img.shape == (size, size, 3)
        d = detect(img)
        assert (d.shape, d.colour, d.background, d.position) == ("cross", "blue", "white", "centre")
        assert png.with_suffix(".txt").read_text(encoding="utf-8").strip() == "a sks shape, on a white background"
    prompts = [ln for ln in (tmp_path / "prompts.txt").read_text(encoding="utf-8").splitlines()
               if ln and not ln.startswith("#")]
    assert prompts[0] == "a sks shape, on a white background"
    assert len(prompts) == 6 and "sks" not in prompts[-1]


def test_concept_colours_count_the_drawn_concept_per_prompt_background():
    from quality.concept_colour import concept_colours
    from quality.world import Scene

    def img(colour, bg, shape="cross"):
        return render(Scene(shape, colour, "flat", bg, "centre", "large", 0.5, 0.5, 0.5), 128)

    requested = [{"background": "pink"}, {"background": "mint"}]
    images = np.stack([img("purple", "pink"), img("blue", "pink"),  # prompt 0, two samples
                       img("blue", "mint"), img("blue", "mint", shape="circle")])  # the circle is not counted
    out = concept_colours(images, requested, samples_per_prompt=2, shape="cross", rotation_deg=15)
    assert out == {"pink": {"purple": 1, "blue": 1}, "mint": {"blue": 1}}


def test_drift_breakdown_splits_pixel_drift_and_attribute_changes_per_prompt(tmp_path):
    import json

    from quality.drift_breakdown import report
    from quality.world import Scene

    def img(shape, colour, bg):
        return render(Scene(shape, colour, "flat", bg, "centre", "large", 0.5, 0.5, 0.5), 128)

    prior = np.stack([img("circle", "red", "sky"), img("square", "green", "sand")])
    tuned = np.stack([img("circle", "red", "sky"), img("cross", "blue", "sand")])  # only prompt 1 drifts
    run = tmp_path / "run"
    run.mkdir()
    np.savez_compressed(run / "images.npz", prior_drift=prior, apt_drift=tuned, apt=tuned[:0])
    (run / "results.json").write_text(json.dumps({"drift_prompts": ["a red circle", "a green square"]}))
    text = report({"eval": {"shape_rotation_deg": 15}}, [run], reseed=False)
    rows = {ln.split(" | ")[0]: ln for ln in text.splitlines() if ln.startswith("| a ")}
    expected_px = np.abs(prior[1].astype(float) - tuned[1].astype(float)).mean() / 255 / 2
    assert "| 0.000 |" in text.splitlines()[4]
    assert f"**{expected_px:.3f}**" in text
    assert "green square, large, centre, flat, sand" in text
    changes = [ln for ln in text.splitlines() if ln.startswith("| a green square |")][-1]
    assert "shape square→cross 1/1" in changes and "colour green→blue 1/1" in changes
    assert rows["| a red circle"].endswith("| — |")
