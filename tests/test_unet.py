"""The diffusion U-Net against the CompVis reference, its variants, checkpointing and argument errors."""
import json
import math

import pytest
import torch

from ldm.checkpoint import load_weights
from ldm.modules.attention import CrossAttention, SpatialTransformer
from ldm.modules.diffusionmodules.openaimodel import AttentionBlock, ResBlock, UNetModel
from ldm.modules.diffusionmodules.util import timestep_embedding
from ldm.util import instantiate_from_config
from tests.unet_fixtures import randomize_

UNET_PREFIX = "model.diffusion_model."
# UNet params of latent-diffusion txt2img-1p4B-eval.yaml and stable-diffusion v1-inference.yaml.
LARGE_UNET = dict(
    in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1], num_res_blocks=2,
    channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True, transformer_depth=1,
    use_checkpoint=True, legacy=False,
)
RELEASED_UNETS = {
    "ldm_txt2img_f8_large": dict(LARGE_UNET, image_size=32, context_dim=1280),
    "sd_v1_unet": dict(LARGE_UNET, image_size=64, context_dim=768),
}
TINY = dict(image_size=8, in_channels=3, out_channels=3, model_channels=32, num_res_blocks=1, channel_mult=[1, 2])


def test_timestep_embedding_is_cos_first_with_reference_frequencies():
    t = torch.tensor([0, 3, 999])
    emb = timestep_embedding(t, 7)
    assert emb.shape == (3, 7) and emb.dtype == torch.float32
    freqs = torch.tensor([math.exp(-math.log(10000) * i / 3) for i in range(3)])
    args = t[:, None].double() * freqs[None].double()
    torch.testing.assert_close(emb[:, :3], torch.cos(args).float(), atol=1e-4, rtol=0)
    torch.testing.assert_close(emb[:, 3:6], torch.sin(args).float(), atol=1e-4, rtol=0)
    assert torch.all(emb[:, 6] == 0)  # odd dim: one zero column
    assert torch.equal(timestep_embedding(t, 4, repeat_only=True), t[:, None].float().repeat(1, 4))


@torch.no_grad()
def test_unet_small_matches_reference(unet_small):
    config, weights, data = unet_small
    model = UNetModel(**config).eval()
    load_weights(model, weights, strict=True)
    out = model(data["x"], data["t"], context=data["context"])
    torch.testing.assert_close(out, data["out"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(RELEASED_UNETS))
def test_state_dict_matches_released_key_list(reference_dir, name):
    listed = json.loads((reference_dir / f"{name}.keys.json").read_text())
    expected = [(k[len(UNET_PREFIX):], shape) for k, shape in listed if k.startswith(UNET_PREFIX)]
    with torch.device("meta"):
        model = UNetModel(**RELEASED_UNETS[name])
    ours = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert len(expected) == 686
    assert ours == expected  # names, shapes and order


def test_builds_from_yaml_style_config():
    # Lists arrive from YAML as lists; the config checker must accept them for the Sequence[int] hints.
    config = {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
              "params": dict(TINY, attention_resolutions=[2], num_head_channels=32)}
    model = instantiate_from_config(config)
    assert isinstance(model, UNetModel) and model.channel_mult == (1, 2)


def _count_calls(module: torch.nn.Module) -> list:
    calls = []
    module.register_forward_hook(lambda *args: calls.append(1))
    return calls


@pytest.mark.parametrize("spatial", [True, False], ids=["spatial_transformer", "attention_block"])
def test_checkpointing_recomputes_and_changes_nothing(unet_small, spatial):
    config, weights, data = unet_small
    if not spatial:
        config = dict(config, use_spatial_transformer=False, context_dim=None, use_new_attention_order=True)
    results = {}
    for use_checkpoint in (False, True):
        model = UNetModel(**dict(config, use_checkpoint=use_checkpoint)).train()
        if spatial:
            load_weights(model, weights, strict=True)
        else:
            randomize_(model)
        attention = model.middle_block[1]
        inner = attention.transformer_blocks[0].attn2 if spatial else attention.qkv
        res_calls, attn_calls = _count_calls(model.middle_block[0].in_layers), _count_calls(inner)
        x = data["x"].clone().requires_grad_(True)
        out = model(x, data["t"], context=data["context"] if spatial else None)
        assert (len(res_calls), len(attn_calls)) == (1, 1)
        out.square().mean().backward()
        # Checkpointed blocks run their forward again during backward; plain ones do not.
        assert (len(res_calls), len(attn_calls)) == ((2, 2) if use_checkpoint else (1, 1))
        grads = {n: p.grad for n, p in model.named_parameters()}
        results[use_checkpoint] = out.detach(), x.grad, grads
    out_plain, x_grad_plain, grads_plain = results[False]
    out_ckpt, x_grad_ckpt, grads_ckpt = results[True]
    torch.testing.assert_close(out_ckpt, out_plain, atol=1e-6, rtol=0)
    torch.testing.assert_close(x_grad_ckpt, x_grad_plain, atol=1e-7, rtol=1e-5)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, atol=1e-7, rtol=1e-5, msg=name)


def test_checkpointing_is_off_without_grad(unet_small):
    config, weights, data = unet_small
    model = UNetModel(**dict(config, use_checkpoint=True))
    calls = _count_calls(model.middle_block[0].in_layers)
    with torch.no_grad():
        model(data["x"], data["t"], context=data["context"])
    assert len(calls) == 1


VARIANTS = {
    "scale_shift_updown_head_channels": dict(
        attention_resolutions=[1, 2], num_head_channels=32, use_scale_shift_norm=True, resblock_updown=True),
    "class_conditional_new_order": dict(
        attention_resolutions=[2], num_heads=2, num_classes=5, use_new_attention_order=True, dropout=0.1),
    "legacy_upsample_heads_no_conv_resample": dict(
        attention_resolutions=[1], num_heads=1, num_heads_upsample=4, conv_resample=False, channel_mult=[2, 2]),
    "codebook_ids": dict(attention_resolutions=[2], num_heads=4, n_embed=10),
    "one_dimensional": dict(attention_resolutions=[2], num_heads=2, dims=1, num_res_blocks=2),
    "cross_attention_depth_2": dict(
        attention_resolutions=[1], num_head_channels=16, use_spatial_transformer=True, context_dim=24,
        transformer_depth=2),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variants_run_with_correct_shapes_and_gradients(name):
    torch.manual_seed(0)
    kwargs = dict(TINY, **VARIANTS[name])
    model = UNetModel(**kwargs)
    spatial_shape = (8,) * kwargs.get("dims", 2)
    x = torch.randn(2, 3, *spatial_shape)
    t = torch.tensor([10, 900])
    extra = {}
    if "num_classes" in kwargs:
        extra["y"] = torch.tensor([1, 4])
    if "context_dim" in kwargs:
        extra["context"] = torch.randn(2, 5, kwargs["context_dim"])
    # Freshly built, the zero-initialised output conv makes the model output exactly zero (ADM init).
    if "n_embed" not in kwargs:
        assert torch.all(model(x, t, **extra) == 0)
    randomize_(model)
    out = model(x, t, **extra)
    expected_channels = kwargs.get("n_embed", kwargs["out_channels"])
    assert out.shape == (2, expected_channels, *spatial_shape)
    out.square().mean().backward()
    # The codebook head replaces `out`, which then is unused (as in the reference).
    unused = ("out.",) if "n_embed" in kwargs else ()
    for n, p in model.named_parameters():
        if not n.startswith(unused):
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n


def test_class_label_changes_output():
    model = randomize_(UNetModel(**dict(TINY, attention_resolutions=[], num_heads=1, num_classes=3)))
    x, t = torch.randn(1, 3, 8, 8).expand(2, -1, -1, -1), torch.tensor([5, 5])
    out = model(x, t, y=torch.tensor([0, 2]))
    assert not torch.allclose(out[0], out[1])


def test_heads_follow_reference_rules():
    def heads(model):
        return [m.num_heads for m in model.modules() if isinstance(m, AttentionBlock)]
    # Encoder+middle use num_heads; the decoder uses num_heads_upsample only for legacy non-spatial attention.
    legacy = UNetModel(**dict(TINY, attention_resolutions=[1], num_heads=1, num_heads_upsample=4, legacy=True))
    assert heads(legacy) == [1, 1, 4, 4]
    new = UNetModel(**dict(TINY, attention_resolutions=[1], num_heads=1, num_heads_upsample=4, legacy=False))
    assert heads(new) == [1, 1, 1, 1]
    per_channel = UNetModel(**dict(TINY, attention_resolutions=[1, 2], num_head_channels=16))
    assert heads(per_channel) == [2, 4, 4, 4, 4, 2, 2]  # 32 channels at level 0, 64 at level 1
    spatial = UNetModel(**dict(TINY, attention_resolutions=[2], num_heads=4, use_spatial_transformer=True,
                               context_dim=8))
    attn = spatial.middle_block[1].transformer_blocks[0].attn1
    assert (attn.heads, attn.dim_head) == (4, 16)


def _reference_qkv_attention(qkv, n_heads, legacy):
    """The reference's einsum implementation of QKVAttention(Legacy), written independently of SDPA."""
    bs, width, length = qkv.shape
    ch = width // (3 * n_heads)
    if legacy:
        q, k, v = qkv.reshape(bs * n_heads, ch * 3, length).split(ch, dim=1)
    else:
        q, k, v = (t.reshape(bs * n_heads, ch, length) for t in qkv.chunk(3, dim=1))
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale).softmax(dim=-1)
    return torch.einsum("bts,bcs->bct", weight, v).reshape(bs, -1, length)


@pytest.mark.parametrize("new_order", [False, True], ids=["legacy_order", "new_order"])
@torch.no_grad()
def test_attention_block_matches_reference_math(new_order):
    torch.manual_seed(0)
    block = randomize_(AttentionBlock(64, num_heads=4, use_new_attention_order=new_order))
    x = torch.randn(2, 64, 4, 5)
    flat = x.reshape(2, 64, -1)
    expected = flat + block.proj_out(_reference_qkv_attention(block.qkv(block.norm(flat)), 4, legacy=not new_order))
    torch.testing.assert_close(block(x), expected.reshape(x.shape), atol=1e-5, rtol=0)


@torch.no_grad()
def test_scale_shift_norm_is_adaptive_group_norm():
    torch.manual_seed(0)
    block = randomize_(ResBlock(32, 16, dropout=0.0, out_channels=64, use_scale_shift_norm=True))
    x, emb = torch.randn(2, 32, 6, 6), torch.randn(2, 16)
    scale, shift = block.emb_layers(emb)[:, :, None, None].chunk(2, dim=1)
    h = block.out_layers[0](block.in_layers(x)) * (1 + scale) + shift
    expected = block.skip_connection(x) + block.out_layers[1:](h)
    torch.testing.assert_close(block(x, emb), expected, atol=1e-5, rtol=0)


def test_fresh_spatial_transformer_is_identity():
    block = SpatialTransformer(32, n_heads=2, d_head=8, context_dim=12)
    x = torch.randn(1, 32, 4, 4)
    assert torch.equal(block(x, torch.randn(1, 3, 12)), x)


@torch.no_grad()
def test_bfloat16_model_runs_in_bfloat16(unet_small):
    config, weights, data = unet_small
    model = UNetModel(**config).eval()
    load_weights(model, weights, strict=True)
    out = model.to(torch.bfloat16)(data["x"].bfloat16(), data["t"], context=data["context"].bfloat16())
    assert out.dtype == torch.bfloat16
    assert (out.float() - data["out"]).abs().max() < 0.2  # |out| reaches 3; bf16 keeps ~3 significant digits


@pytest.mark.parametrize("kwargs, match", [
    (dict(attention_resolutions=[1]), "num_heads or num_head_channels"),
    (dict(attention_resolutions=[1], num_heads=4, use_spatial_transformer=True), "needs context_dim"),
    (dict(attention_resolutions=[1], num_heads=4, context_dim=16), "use_spatial_transformer"),
    (dict(attention_resolutions=[1], num_heads=4, use_fp16=True), "mixed precision"),
    (dict(attention_resolutions=[1], num_heads=4, model_channels=48), "multiple of 32"),
    (dict(attention_resolutions=[1], num_heads=3), "3 attention heads"),
    (dict(attention_resolutions=[1], num_head_channels=24), "num_head_channels=24"),
    (dict(attention_resolutions=[1], num_heads=4, use_spatial_transformer=True, context_dim=8, dims=3), "2D"),
    (dict(attention_resolutions=[1], num_heads=4, dims=4), "dims must be 1, 2 or 3"),
])
def test_inconsistent_constructor_args_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UNetModel(**dict(TINY, **kwargs))


def test_bad_forward_inputs_are_rejected():
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    plain = UNetModel(**dict(TINY, attention_resolutions=[], num_heads=1))
    with pytest.raises(ValueError, match="needs timesteps"):
        plain(x)
    with pytest.raises(ValueError, match="class-conditional"):
        plain(x, t, y=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="no cross-attention"):
        plain(x, t, context=torch.randn(2, 4, 8))
    classes = UNetModel(**dict(TINY, attention_resolutions=[], num_heads=1, num_classes=3))
    with pytest.raises(ValueError, match="class-conditional"):
        classes(x, t)
    with pytest.raises(ValueError, match="one class index per sample"):
        classes(x, t, y=torch.tensor([[0], [1]]))
    attention = CrossAttention(32, context_dim=8, heads=2, dim_head=16)
    with pytest.raises(ValueError, match="context_dim=8"):
        attention(torch.randn(2, 5, 32), torch.randn(2, 4, 16))
