"""GroupViT's two tracks (faithful / pure) and segmentation emerging from captions on cell scenes
(:mod:`textseg.train.emergence`, the library half of benchmarks/groupvit_emergence.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from textseg.data.synthetic import cell_scenes
from textseg.errors import TextsegError
from textseg.train import emergence as E
from textseg.train.groupvit import (
    GroupViTModelCfg,
    GroupViTTrainModule,
    assignment_diversity,
    multi_label_loss,
)

TINY = dict(image_size=32, patch_size=8, width=32, heads=2, depths=[1, 0], num_group_tokens=[4, 0],
            num_output_groups=[4, 0], text_width=32, text_heads=2, text_layers=1, context_length=16,
            embed_dim=16, proj_hidden=32, proj_layers=1, drop_path_rate=0.0)


def test_variant_names_set_the_fields_and_faithful_is_the_official_default():
    f = GroupViTModelCfg(**TINY).build().cfg
    assert (f.vision.content_only, f.vision.hard_assignment, f.vision.eval_hard_assignment, f.vision.assign_pool,
            f.multi_label_pool, f.assign_diversity) == (False, True, None, "mean", "image", 0.0)
    p = GroupViTModelCfg(variant="pure", **TINY).build()
    assert (p.cfg.vision.content_only, p.cfg.vision.hard_assignment, p.cfg.vision.eval_hard_assignment,
            p.cfg.multi_label_pool, p.cfg.assign_diversity) == (True, False, True, "max_group", 1.0)
    assert GroupViTModelCfg(variant="pure", assign_diversity=0.0, **TINY).build().cfg.assign_diversity == 0.0
    # an explicit field overrides the variant's value (question (d): the pure track with Gumbel hard)
    assert GroupViTModelCfg(variant="pure", hard_assignment=True, **TINY).build().cfg.vision.hard_assignment
    # the options survive the native config card (what --weights rebuilds from)
    again = type(p).from_config_dict(p.config_dict())
    assert again.cfg == p.cfg
    with pytest.raises(TextsegError, match="variant"):
        GroupViTModelCfg(variant="nope", **TINY).build()
    # the benchmark's tracks: the variant's soft training, the official Gumbel hard assignment
    pv = E.emergence_model_cfg("pure").build().cfg.vision
    fv = E.emergence_model_cfg("faithful").build().cfg.vision
    assert (pv.hard_assignment, pv.content_only) == (False, True)
    assert (fv.hard_assignment, fv.gumbel_noise, fv.content_only) == (True, True, False)
    nn = E.emergence_model_cfg("pure", **E.NOISE_FREE_HARD).build().cfg.vision
    assert (nn.hard_assignment, nn.gumbel_noise) == (True, False)


def test_content_only_groups_are_pooled_from_their_members_only():
    """Pure track: a group's token is proj(mean of its members' values) then the channel MLP, with no
    group-token residual; an empty group's output is the same for every image (no global summary).
    Transcribed here from the block's weights; the faithful block differs from this."""
    torch.manual_seed(0)
    model = GroupViTModelCfg(variant="pure", **TINY).build().eval()
    stage = model.visual.stages[0]
    blk = stage.grouping
    x = torch.randn(3, 16, 32)
    with torch.no_grad():
        new_x, soft = stage(x, None)[0], stage(x, None)[2]
        # transcription: layers over the segments alone; queries from the bare tokens
        seg = x
        for b in stage.blocks:
            seg = b(seg)
        seg = blk.norm_x(seg)
        q = blk.norm_post_tokens(blk.mlp_inter(blk.norm_tokens(stage.group_token.expand(3, -1, -1))))
        q = blk.pre_assign_attn(q, seg)
        a = blk.assign
        raw = (a.q_proj(q) @ a.k_proj(seg).transpose(1, 2)) * a.scale
        hard = F.one_hot(raw.argmax(1), raw.shape[1]).transpose(1, 2).float()
        pooled = a.proj((hard / (hard.sum(-1, keepdim=True) + 1.0)) @ a.v_proj(seg))
        expect = pooled + blk.mlp_channels(blk.norm_new_x(pooled))
    torch.testing.assert_close(new_x, expect, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(soft, raw.softmax(1), rtol=1e-5, atol=1e-6)
    empty = hard.sum(-1) == 0  # B x G
    if empty.any():
        const = a.proj(torch.zeros(32)) + blk.mlp_channels(blk.norm_new_x(a.proj(torch.zeros(32))))
        torch.testing.assert_close(new_x[empty], const.expand(int(empty.sum()), -1), rtol=1e-5, atol=1e-5)
    # soft in training (no Gumbel, no one-hot): training forward is deterministic
    model.train()
    with torch.no_grad():
        assert torch.equal(stage(x, None)[0], stage(x, None)[0])


def test_assignment_diversity_is_the_negative_patch_group_mutual_information():
    """(H(p | patch) - H(mean p)) / log G, written out with loops: -1 for confident patches spread
    evenly over every group, 0 for one group taking every patch or for uniform assignments."""
    torch.manual_seed(0)
    b, g, n = 2, 4, 6
    maps = torch.randn(b, g, n).softmax(1)
    h_patch = -sum(float(maps[i, j, k] * maps[i, j, k].log()) for i in range(b) for j in range(g)
                   for k in range(n)) / (b * n)
    marg = [float(maps[:, j].mean()) for j in range(g)]
    h_marg = -sum(m * np.log(m) for m in marg)
    assert float(assignment_diversity(maps)) == pytest.approx((h_patch - h_marg) / np.log(g), abs=1e-5)
    spread = F.one_hot(torch.arange(8) % g, g).T[None].float()  # 1 x G x 8: two patches per group
    assert float(assignment_diversity(spread)) == pytest.approx(-1.0, abs=1e-5)
    one = torch.zeros(2, g, 8)
    one[:, 0] = 1
    assert float(assignment_diversity(one)) == pytest.approx(0.0, abs=1e-5)
    assert float(assignment_diversity(torch.full((2, g, 8), 1 / g))) == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("variant", ["faithful", "pure"])
def test_assignment_diversity_enters_the_training_loss_only_when_set(variant):
    """assign_diversity = w adds w * assignment_diversity(the soft patch-group maps) to the loss; 0
    (the official default) adds nothing and leaves the loss as it was."""
    torch.manual_seed(0)
    model = GroupViTModelCfg(variant=variant, assign_diversity=0.0, **TINY).build()
    images, text = torch.randn(3, 3, 32, 32), torch.randint(1, 50, (3, 3, 16))
    plain = GroupViTTrainModule(model)
    torch.manual_seed(1)
    base = plain({"image": images, "text": text})
    assert "div" not in base
    weighted = GroupViTModelCfg(variant=variant, assign_diversity=0.5, **TINY).build()
    weighted.load_state_dict(model.state_dict())
    module = GroupViTTrainModule(weighted)
    module.load_state_dict(plain.state_dict())
    torch.manual_seed(1)  # the same Gumbel draw for the faithful track
    out = module({"image": images, "text": text})
    with torch.no_grad():
        torch.manual_seed(1)
        maps = weighted.forward_intermediates(images)["group_maps"][-1].flatten(2)
    torch.testing.assert_close(out["div"], assignment_diversity(maps), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"], base["loss"] + 0.5 * out["div"], rtol=1e-5, atol=1e-5)


def test_sum_pool_is_the_unnormalised_sum():
    torch.manual_seed(0)
    model = GroupViTModelCfg(assign_pool="sum", **TINY).build().eval()
    a = model.visual.stages[0].grouping.assign
    g, s = torch.randn(2, 4, 32), torch.randn(2, 16, 32)
    with torch.no_grad():
        out, _ = a(g, s)
        raw = (a.q_proj(g) @ a.k_proj(s).transpose(1, 2)) * a.scale
        hard = F.one_hot(raw.argmax(1), 4).transpose(1, 2).float()
        torch.testing.assert_close(out, a.proj(hard @ a.v_proj(s)), rtol=1e-5, atol=1e-5)


def test_max_group_multi_label_loss_matches_a_transcription():
    """multi_label_pool="max_group": an image scores a text by its best non-empty group; the soft
    image->text cross-entropy (1/K on its own K texts) and text->image cross-entropy as the official
    loss, written out here with loops."""
    torch.manual_seed(0)
    b, g, k, d = 3, 4, 2, 8
    groups = F.normalize(torch.randn(b, g, d), dim=-1)
    texts = F.normalize(torch.randn(b, k, d), dim=-1)
    valid = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    scale = 7.0
    got = multi_label_loss(groups, texts, scale, valid=valid)
    flat = texts.reshape(b * k, d)
    sim = torch.empty(b, b * k)
    for i in range(b):
        for t in range(b * k):
            sim[i, t] = max(float(groups[i, j] @ flat[t]) for j in range(g) if valid[i, j])
    logits = scale * sim
    li = 0.0
    for i in range(b):
        lsm = logits[i].log_softmax(0)
        li += -sum(lsm[i * k + j] / k for j in range(k))
    lt = 0.0
    for t in range(b * k):
        lt += -logits[:, t].log_softmax(0)[t // k]
    expect = 0.5 * (li / b + lt / (b * k))
    torch.testing.assert_close(got, torch.as_tensor(expect, dtype=got.dtype), rtol=1e-5, atol=1e-6)
    # the pooled path is not this one (the official loss on the mean embedding differs)
    assert not torch.allclose(multi_label_loss(F.normalize(groups.mean(1), dim=-1), texts, scale), got)


def test_ceiling_baselines_and_the_evaluation_on_hand_made_groups(monkeypatch):
    """On cell scenes perfect patch groups score the ceiling (bilinear upsampling, as the inference,
    loses only cell corners); the zero-shot path scores a hand-made perfect grouping at that ceiling
    and one group per image low, so a collapse is the model's, not the evaluation's."""
    scenes = cell_scenes(20, seed=5)
    ceil = E.ceiling(scenes)
    assert 95 < ceil < 100 and E.all_background(scenes) < 20
    torch.manual_seed(0)
    model = E.emergence_model_cfg("pure").build().eval()
    text = model.embed_texts(list(scenes.classes), E.PROMPT)
    onehot = F.one_hot(torch.from_numpy(scenes.masks).long(), len(scenes.classes)).permute(0, 3, 1, 2).float()
    state = {"maps": F.avg_pool2d(onehot, 8), "start": 0}

    def fake(pixels, **_):  # group c = class c's cells, embedded as class c's text
        b, s = pixels.shape[0], state["start"]
        maps = state["maps"][s:s + b]
        state["start"] = (s + b) % len(scenes.masks)
        return {"group_embeds": text[None].expand(b, -1, -1), "image_embed": maps.mean((2, 3)) @ text,
                "group_maps": [maps]}

    monkeypatch.setattr(model, "forward_intermediates", fake)
    assert E.zero_shot(model, scenes, batch_size=7)["mIoU"] == pytest.approx(ceil)
    state["start"] = 0
    rep = E.grouping_report(model, scenes, batch_size=7)
    assert rep["oracle_mIoU"] == pytest.approx(ceil) and 2 <= rep["groups_per_image"] <= 3
    state["maps"] = torch.zeros_like(state["maps"])
    state["maps"][:, 0] = 1
    state["start"] = 0
    assert E.zero_shot(model, scenes, batch_size=7)["mIoU"] < 20


@pytest.fixture(scope="module")
def trained_pure(tmp_path_factory):
    torch.set_num_threads(1)
    train = cell_scenes(1500, seed=1000)
    model = E.train_on_scenes(E.emergence_model_cfg("pure"), train, STEPS, str(tmp_path_factory.mktemp("pure")))
    return model, cell_scenes(120, seed=4242)


STEPS = 300


def test_segmentation_emerges_from_captions_on_the_pure_track(trained_pure):
    """A short run (300 steps, captions only) segments held-out scenes zero-shot well above random
    init and all-background. Margin 25 points: measured here 50.5 mIoU against random init 0.8
    and all-background 13.3; the same 300-step run on seeds 1 / 2 scored 65.8 / 57.9 (the worst
    seed 37 points above all-background), the benchmark's three seeds at 1200 steps 89.7-92.2."""
    model, test = trained_pure
    torch.manual_seed(0)
    rand = E.emergence_model_cfg("pure").build().eval()
    got = E.zero_shot(model, test)["mIoU"]
    assert got > max(E.zero_shot(rand, test)["mIoU"], E.all_background(test)) + 25, got
    assert E.grouping_report(model, test)["oracle_mIoU"] > got - 5
    # its labelling of perfect groups (the true partition through its own value path) beats its own
    # grouping: measured here 97.6 (= the ceiling) against 50.5, on seeds 1 / 2 97.6 / 97.6 against
    # 65.8 / 57.9 (the benchmark at 1200 steps: 97.6 / 97.6 / 92.0 against 90.7 / 89.7 / 92.2)
    true = E.true_partition_zero_shot(model, test)["mIoU"]
    assert true > max(got + 10, 80), (true, got)


def test_bypass_diagnostic_random_assignment_lowers_the_pure_tracks_scores(trained_pure):
    """The pure track's loss-relevant scores depend on the grouping: replacing the learned assignment
    by a random map, a per-image shuffle or one group lowers the noun margin (measured here, seed 0
    at 300 steps: 0.46 -> 0.23-0.27; seed 1: 0.44 -> 0.18-0.26) and the noun presence (1.00 ->
    0.57-0.66; seed 1: 1.00 -> 0.63-0.88). Seed 2 at 300 steps moves less (margin 0.51 -> 0.41-0.44,
    presence 0.99 -> 0.85-0.98), so these thresholds hold for this run, not for every seed. (The
    faithful track's do not move: the benchmark's bypass rows.)"""
    model, test = trained_pure
    diag = E.bypass_diagnostic(model, test)
    learned = diag["learned"]
    assert learned["presence"] > 0.9
    for mode in ("random", "shuffle", "single"):
        assert diag[mode]["noun_margin"] < learned["noun_margin"] - 0.1, diag
        assert diag[mode]["presence"] < learned["presence"] - 0.15, diag
    assert np.isfinite(learned["retrieval"])


def test_official_inference_from_an_earlier_grouping_stage():
    """Question (c): ``stage=0`` labels pixels by the first-stage groups, each embedded as the final
    groups are (final LayerNorm, image projector), read through the first assignment upsampled;
    transcribed here stage by stage. The default (-1) is the official last stage."""
    torch.manual_seed(0)
    cfg = dict(TINY, depths=[0, 0, 0], num_group_tokens=[6, 3, 0], num_output_groups=[6, 3, 0])
    model = GroupViTModelCfg(variant="pure", **cfg).build().eval()
    px = torch.randn(2, 3, 32, 32)

    def up(a):
        return F.interpolate(a.reshape(2, a.shape[1], 4, 4), size=(32, 32), mode="bilinear",
                             align_corners=False).argmax(1)

    with torch.no_grad():
        v = model.visual
        x = v.patch_norm(v.patch_embed(px).flatten(2).transpose(1, 2)) + v.pos_embed
        g0, tok0, a0 = v.stages[0](x, None)
        g1, _, a1 = v.stages[1](g0, tok0)
        emb0 = F.normalize(model.image_proj(v.norm(g0)), dim=-1)
        emb1 = F.normalize(model.image_proj(v.norm(g1)), dim=-1)
        first, last = model.official_features(px, stage=0), model.official_features(px)
    assert first["group_embeds"].shape == (2, 6, 16)
    torch.testing.assert_close(first["group_embeds"], emb0, rtol=1e-5, atol=1e-5)
    assert torch.equal(first["group_index"], up(a0))
    torch.testing.assert_close(last["group_embeds"], emb1, rtol=1e-5, atol=1e-5)
    assert torch.equal(last["group_index"], up(a1 @ a0))
    torch.testing.assert_close(first["image_embed"], last["image_embed"])
    text = torch.randn(4, 16)
    assert not torch.equal(model.segment_official(px, text, stage=0), model.segment_official(px, text))
    model.official_stage = 0  # the attribute the Segmenter's path reads
    torch.testing.assert_close(model.official_features(px)["group_embeds"], emb0, rtol=1e-5, atol=1e-5)
    with pytest.raises(TextsegError, match="grouping stage"):
        model.official_features(px, stage=2)


def test_gumbel_noise_off_trains_with_the_inference_assignment():
    """``gumbel_noise=False`` with a hard assignment: the training forward is the deterministic
    argmax one-hot (straight-through), equal to the eval forward; the official default draws noise."""
    torch.manual_seed(0)
    model = GroupViTModelCfg(variant="pure", hard_assignment=True, gumbel_noise=False, **TINY).build()
    a = model.visual.stages[0].grouping.assign
    g, s = torch.randn(2, 4, 32), torch.randn(2, 16, 32)
    with torch.no_grad():
        raw = (a.q_proj(g) @ a.k_proj(s).transpose(1, 2)) * a.scale
        hard = F.one_hot(raw.argmax(1), 4).transpose(1, 2).float()
        expect = a.proj((hard / (hard.sum(-1, keepdim=True) + 1.0)) @ a.v_proj(s))
        a.train()
        torch.testing.assert_close(a(g, s)[0], expect, rtol=1e-5, atol=1e-5)
        official = GroupViTModelCfg(**TINY).build().visual.stages[0].grouping.assign.train()
        assert not torch.equal(official(g, s)[0], official(g, s)[0])  # Gumbel noise: two draws differ
