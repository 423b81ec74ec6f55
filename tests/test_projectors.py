"""Projectors: paper-scale parameter counts (meta device), LLaVA-SP parity with an independent official-style
computation, other grids, gradients, the official key map and input errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from spatial_mllm.projectors import PROJECTORS, VisionGeometry, build_projector
from spatial_mllm.projectors.base import to_grid
from spatial_mllm.projectors.layers import LayerNorm2d, trunc_normal_
from spatial_mllm.projectors.llava_sp import detail_conv_geometry, sfe_sizes

PAPER = VisionGeometry(width=1024, grid=24, num_layers=24)
LLM = 4096
LLAVA_SP = ("llava_sp_pooling", "llava_sp_cropping", "llava_sp_pooling_nodfi")
# Small widths keep real runs fast; spatial_width shrinks the 512-d SFE tokens of LLaVA-SP likewise.
SMALL_WIDTH, SMALL_LLM, SMALL_SPATIAL = 16, 32, 8


def paper_scale(name: str, **options):
    with torch.device("meta"):
        return build_projector(name, PAPER, LLM, **options)


def small(name: str, grid: int = 24, num_layers: int = 24, **options):
    if name in LLAVA_SP:
        options.setdefault("spatial_width", SMALL_SPATIAL)
    torch.manual_seed(0)
    return build_projector(name, VisionGeometry(SMALL_WIDTH, grid, num_layers), SMALL_LLM, **options)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def features_for(projector, batch: int = 2, dtype=torch.float32) -> list[torch.Tensor]:
    n, width = projector.vision.grid**2, projector.vision.width
    device = next(projector.parameters()).device  # meta at paper scale
    return [torch.randn(batch, n, width, dtype=dtype, device=device) for _ in projector.feature_layers]


# ---- paper scale ----


@pytest.mark.parametrize(
    "name, params, tokens",
    [
        ("mlp2x_gelu", 20_979_712, 576),
        ("saep", 25_222_144, 144),
        ("ldpv2", 21_020_672, 144),
        ("tokenpacker", 36_722_688, 144),
        ("c_abstractor", 37_398_016, 144),
    ],
)
def test_paper_scale_parameters_and_tokens(name, params, tokens):
    projector = paper_scale(name)
    assert n_params(projector) == params
    assert projector.num_tokens == tokens
    assert projector(features_for(projector, batch=1)).shape == (1, tokens, LLM)


def test_saep_reads_the_spec_layers():
    assert paper_scale("saep").feature_layers == (12, 16, 22, 23)
    assert paper_scale("tokenpacker").feature_layers == (12, 16, 22, 23)
    assert paper_scale("c_abstractor").feature_layers == (24,)


@pytest.mark.parametrize("name", LLAVA_SP)
def test_llava_sp_paper_scale_parts(name):
    projector = paper_scale(name)
    assert projector.num_tokens == 582
    assert n_params(projector.sfe) == 763_363_328
    assert projector.sfe.convs[-1].weight.numel() == 301_989_888
    assert n_params(projector.patch_projector) == 20_979_712
    ws = {"llava_sp_pooling": 4_194_304, "llava_sp_cropping": 4_198_400, "llava_sp_pooling_nodfi": 2_097_152}
    assert n_params(projector.spatial_projector) == ws[name]
    if name == "llava_sp_pooling_nodfi":
        assert projector.dfi is None
    else:
        assert n_params(projector.dfi.detail_conv) == 134_217_728
        qkv = projector.dfi.query, projector.dfi.key, projector.dfi.value
        assert sum(n_params(m) for m in qkv) == 791_040
    out = projector(features_for(projector, batch=1))
    assert out.shape == (1, 582, LLM)


def test_official_key_map_shapes_at_paper_scale():
    expected = {
        "model.conv_4.1.weight": (512, 1024, 4, 4),
        "model.conv_20.1.weight": (512, 1024, 20, 20),
        "model.conv_24.weight": (512, 1024, 24, 24),
        "model.conv_CM.weight": (512, 1024, 16, 16),
        "model.conv_linear.1.weight": (4096, 1024),
        "model.query_projector.0.weight": (512,),
        "model.value_projector.1.weight": (512, 512),
        "model.mm_projector.0.weight": (4096, 1024),
        "model.mm_projector.2.weight": (4096, 4096),
    }
    projector = paper_scale("llava_sp_pooling")
    state = projector.state_dict()
    key_map = projector.official_key_map()
    for official, shape in expected.items():
        assert tuple(state[key_map[official]].shape) == shape, official


# ---- official key map ----


def official_keys(sfe: str, dfi: bool, ws_bias: bool) -> set[str]:
    """The official state-dict names of a variant, written out from the spec."""
    keys = {f"model.mm_projector.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    if sfe == "pooling":
        keys |= {f"model.conv_{s}.1.weight" for s in (4, 8, 12, 16, 20)} | {"model.conv_24.weight"}
    else:
        keys |= {f"model.conv_{s}.weight" for s in (4, 8, 12, 16, 20, 24)}
    keys.add("model.conv_linear.1.weight")
    if ws_bias:
        keys.add("model.conv_linear.1.bias")
    if dfi:
        keys.add("model.conv_CM.weight")
        keys |= {
            f"model.{role}_projector.{i}.{p}"
            for role in ("query", "key", "value")
            for i in (0, 1)
            for p in ("weight", "bias")
        }
    return keys


@pytest.mark.parametrize(
    "name, options, sfe, dfi, ws_bias",
    [
        ("llava_sp_pooling", {}, "pooling", True, False),
        ("llava_sp_cropping", {}, "cropping", True, True),
        ("llava_sp_pooling_nodfi", {}, "pooling", False, False),
        ("llava_sp_cropping", {"dfi": False}, "cropping", False, True),
    ],
)
def test_official_key_map_covers_each_parameter_once(name, options, sfe, dfi, ws_bias):
    projector = small(name, **options)
    key_map = projector.official_key_map()
    ours = list(key_map.values())
    assert len(ours) == len(set(ours))
    assert sorted(ours) == sorted(name for name, _ in projector.named_parameters())
    assert set(key_map) == official_keys(sfe, dfi, ws_bias)


# ---- LLaVA-SP parity with an independent computation of the official formulation ----


def adaptive_pool_matrix(size: int, grid: int) -> torch.Tensor:
    """(size, grid) averaging matrix of AdaptiveAvgPool1d: window i = [floor(i*g/s), ceil((i+1)*g/s))."""
    matrix = torch.zeros(size, grid, dtype=torch.float64)
    for i in range(size):
        start, end = (i * grid) // size, math.ceil((i + 1) * grid / size)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def layer_norm_by_hand(x, weight, bias, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def gelu_by_hand(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def official_llava_sp(patches: torch.Tensor, w: dict[str, torch.Tensor], sfe: str, dfi: bool) -> torch.Tensor:
    """LLaVA-SP at a 24x24 grid, from the official key names, as plain linear algebra."""
    b, _, c = patches.shape
    image = patches.reshape(b, 24, 24, c).permute(0, 3, 1, 2)  # (B, C, row, col)
    spatial = []
    crops = {4: (10, 14), 8: (8, 16), 12: (6, 18), 16: (4, 20), 20: (2, 22), 24: (0, 24)}
    for size in (4, 8, 12, 16, 20, 24):
        if sfe == "pooling":
            pool = adaptive_pool_matrix(size, 24)
            region = torch.einsum("ih,bchw,jw->bcij", pool, image, pool)
            weight = w[f"model.conv_{size}.1.weight" if size < 24 else "model.conv_24.weight"]
        else:
            lo, hi = crops[size]
            region = image[:, :, lo:hi, lo:hi]
            weight = w[f"model.conv_{size}.weight"]
        # A conv whose kernel covers its whole input is one matrix product over the flattened input.
        spatial.append(region.reshape(b, -1) @ weight.reshape(weight.shape[0], -1).T)
    h = torch.stack(spatial, dim=1)  # (B, 6, d)
    if dfi:
        conv_cm = w["model.conv_CM.weight"]
        windows = F.unfold(image, kernel_size=16, stride=2)  # (B, C*16*16, 25)
        detail = (conv_cm.reshape(conv_cm.shape[0], -1) @ windows).transpose(1, 2)  # (B, 25, d)

        def project(role, x):
            p = f"model.{role}_projector"
            normed = layer_norm_by_hand(x, w[f"{p}.0.weight"], w[f"{p}.0.bias"])
            return normed @ w[f"{p}.1.weight"].T + w[f"{p}.1.bias"]

        q, k, v = project("query", h), project("key", detail), project("value", detail)
        scores = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])
        attention = torch.exp(scores - scores.amax(-1, keepdim=True))
        attention = attention / attention.sum(-1, keepdim=True)
        h = torch.cat([h, attention @ v], dim=-1)
    spatial_tokens = gelu_by_hand(h) @ w["model.conv_linear.1.weight"].T
    if "model.conv_linear.1.bias" in w:
        spatial_tokens = spatial_tokens + w["model.conv_linear.1.bias"]
    hidden = gelu_by_hand(patches @ w["model.mm_projector.0.weight"].T + w["model.mm_projector.0.bias"])
    patch_tokens = hidden @ w["model.mm_projector.2.weight"].T + w["model.mm_projector.2.bias"]
    return torch.cat([spatial_tokens, patch_tokens], dim=1)


@pytest.mark.parametrize(
    "name, options, sfe, dfi",
    [
        ("llava_sp_pooling", {}, "pooling", True),
        ("llava_sp_cropping", {}, "cropping", True),
        ("llava_sp_pooling_nodfi", {}, "pooling", False),
        ("llava_sp_cropping", {"dfi": False}, "cropping", False),
    ],
)
def test_llava_sp_matches_official_formulation(name, options, sfe, dfi):
    projector = small(name, **options).double()
    with torch.no_grad():
        # Biases and LayerNorm affines start at 0/1, which would hide a missing bias or a misplaced norm.
        for param in projector.parameters():
            if param.ndim == 1:
                param.normal_()
    state = projector.state_dict()
    weights = {official: state[ours] for official, ours in projector.official_key_map().items()}
    (patches,) = features_for(projector, dtype=torch.float64)
    with torch.no_grad():
        ours = projector([patches])
    expected = official_llava_sp(patches, weights, sfe, dfi)
    assert ours.shape == (2, 582, SMALL_LLM)
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-9)


def test_llava_sp_spatial_tokens_come_first():
    projector = small("llava_sp_cropping")
    (patches,) = features_for(projector)
    with torch.no_grad():
        projector.spatial_projector[1].weight.zero_()
        projector.spatial_projector[1].bias.fill_(7.0)
        out = projector([patches])
        patch_tokens = projector.patch_projector(patches)
    assert torch.all(out[:, :6] == 7.0)
    torch.testing.assert_close(out[:, 6:], patch_tokens)
    assert not torch.any(out[:, 6:] == 7.0)


def test_llava_sp_geometry_generalises():
    assert sfe_sizes(24) == (4, 8, 12, 16, 20, 24)
    assert sfe_sizes(12) == (2, 4, 6, 8, 10, 12)
    assert sfe_sizes(16) == (3, 5, 8, 11, 13, 16)
    assert sfe_sizes(27) == (5, 9, 14, 18, 23, 27)
    assert detail_conv_geometry(24) == (16, 2)  # the official conv_CM
    for grid in (12, 16, 24, 27):
        projector = small("llava_sp_pooling", grid=grid)
        fmap = torch.randn(1, SMALL_WIDTH, grid, grid)
        assert projector.dfi.detail_conv(fmap).shape[-2:] == (5, 5)
    with pytest.raises(ValueError, match="at least 5x5"):
        small("llava_sp_pooling", grid=4)


def test_llava_sp_spatial_tokens_start_at_a_sane_magnitude():
    projector = small("llava_sp_cropping", spatial_width=64)
    (patches,) = features_for(projector, batch=4)
    with torch.no_grad():
        tokens = projector.sfe(to_grid(patches, 24))
    assert 0.5 < tokens.std().item() < 1.5


# ---- every registered projector ----


def expected_tokens(name: str, grid: int) -> int:
    if name in LLAVA_SP:
        return grid * grid + 6
    if name in ("linear", "mlp2x_gelu"):
        return grid * grid
    return ((grid + 1) // 2) ** 2


def test_expected_token_counts_at_27():
    assert expected_tokens("saep", 27) == 196
    assert small("saep", grid=27).num_tokens == 196
    assert small("llava_sp_pooling", grid=27).num_tokens == 735


@pytest.mark.parametrize("grid", [12, 16, 27])
@pytest.mark.parametrize("name", PROJECTORS.names())
def test_other_grids(name, grid):
    projector = small(name, grid=grid)
    assert projector.num_tokens == expected_tokens(name, grid)
    with torch.no_grad():
        out = projector(features_for(projector))
    assert out.shape == (2, projector.num_tokens, SMALL_LLM)
    assert torch.isfinite(out).all()


TRAINING_CASES = [(name, {}) for name in PROJECTORS.names()] + [
    ("llava_sp_cropping", {"dfi": False}),
    ("saep", {"aggregation": "weighted", "downsampling": "pool"}),
    ("saep", {"aggregation": "mean", "shortcut": False, "activation": "silu", "readout_depth": 3}),
    ("saep", {"layers": (6, 12)}),
]


@pytest.mark.parametrize("grid", [12, 27])
@pytest.mark.parametrize("name, options", TRAINING_CASES)
def test_training_step_reaches_every_parameter(name, options, grid):
    projector = small(name, grid=grid, **options)
    projector.train()
    projector(features_for(projector)).sum().backward()
    for param_name, param in projector.named_parameters():
        assert param.grad is not None, param_name
        assert torch.isfinite(param.grad).all(), param_name
        assert param.grad.abs().sum() > 0, param_name


# ---- options ----


def test_saep_options_change_the_structure():
    assert small("saep", layers=(6, 12)).feature_layers == (6, 12, 23)  # + hidden_states[-2] for the shortcut
    assert small("saep", layers=(6, 12), shortcut=False).feature_layers == (6, 12)
    # concat on channels: the depthwise conv sees 4x the width; mean/weighted keep it.
    assert small("saep").downsample.depthwise.in_channels == 4 * SMALL_WIDTH
    assert small("saep", aggregation="mean").downsample.depthwise.in_channels == SMALL_WIDTH
    assert len(small("saep", readout_depth=1).readout) == 1


def test_saep_weighted_starts_as_mean():
    weighted, mean = small("saep", aggregation="weighted"), small("saep", aggregation="mean")
    feats = features_for(mean)
    maps = [f.transpose(1, 2).reshape(2, SMALL_WIDTH, 24, 24) for f in feats[:4]]
    torch.testing.assert_close(weighted.aggregate(maps), mean.aggregate(maps))


def test_layer_norm_2d_normalises_channels_per_pixel():
    norm = LayerNorm2d(6)
    x = torch.randn(2, 6, 3, 5)
    mean = x.mean(1, keepdim=True)
    var = x.var(1, unbiased=False, keepdim=True)
    torch.testing.assert_close(norm(x), (x - mean) / torch.sqrt(var + 1e-6))


def test_trunc_normal_matches_torch_distribution():
    torch.manual_seed(0)
    ours = trunc_normal_(torch.empty(200_000), std=0.5)
    reference = torch.nn.init.trunc_normal_(torch.empty(200_000), std=0.5, a=-1.0, b=1.0)
    assert ours.abs().max() <= 1.0
    assert abs(ours.std().item() - reference.std().item()) < 0.005  # 0.88 * std once truncated at 2 std
    assert abs(ours.mean().item()) < 0.005


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("llava_sp_pooling", {"sfe": "tiles"}, "sfe must be one of"),
        ("saep", {"aggregation": "max"}, "aggregation must be one of"),
        ("saep", {"downsampling": "shuffle"}, "downsampling must be one of"),
        ("saep", {"activation": "swish"}, "unknown activation"),
        ("saep", {"layers": (12, 30)}, "must lie in 0..24"),
        ("saep", {"readout_depth": 0}, "readout_depth"),
        ("tokenpacker", {"num_heads": 5}, "must divide"),
    ],
)
def test_bad_options_raise(name, options, message):
    with pytest.raises(ValueError, match=message):
        small(name, **options)


@pytest.mark.parametrize("name", PROJECTORS.names())
def test_bad_feature_shapes_raise_value_error(name):
    projector = small(name, grid=12)
    good = features_for(projector)
    with pytest.raises(ValueError, match="reads"):
        projector(good + [good[0]])
    with pytest.raises(ValueError, match=r"12x12 grid of width 16 expects \(B, 144, 16\).*\(2, 143, 16\)"):
        projector([f[:, :143] for f in good])
    with pytest.raises(ValueError, match=r"got \(2, 144, 8\)"):
        projector([f[..., :8] for f in good])
    with pytest.raises(ValueError, match=r"got \(144, 16\)"):
        projector([f[0] for f in good])
