"""Every TeaCache preset against the published numbers and rules, transcribed here from the TeaCache
authors' integrations (ali-vilab/TeaCache, 2025-06): coefficients, the signal they were fitted on,
the warm-up, whether the last step is forced, the thresholds, the adapter, and which transformer
configs pick it automatically."""

from __future__ import annotations

import pytest
from diffusers import (
    CogVideoXTransformer3DModel,
    CosmosTransformer3DModel,
    FluxTransformer2DModel,
    HiDreamImageTransformer2DModel,
    WanTransformer3DModel,
)

import cachekit
from cachekit.registry import registry
from cachekit.schemas import TeaCacheConfig, presets_for, teacache_presets

M, T, P = "modulated_input", "timestep_embedding", "projected_timestep_embedding"

# name: (adapter, coefficients, probe, warm-up steps or share, last step forced, thresholds)
PUBLISHED = {
    "flux-dev": (
        "flux",
        [4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01],
        M,
        1,
        True,
        [0.25, 0.4, 0.6, 0.8],
    ),
    "hunyuan-video": (
        "hunyuan_video",
        [7.33226126e02, -4.01131952e02, 6.75869174e01, -3.14987800e00, 9.61237896e-02],
        M,
        1,
        True,
        [0.1, 0.15],
    ),
    "mochi": (
        "mochi",
        [-3.51241319e03, 8.11675948e02, -6.09400215e01, 2.42429681e00, 3.05291719e-03],
        M,
        1,
        True,
        [0.06, 0.09],
    ),
    "ltx-video-0.9.1": (
        "ltx",
        [2.14700694e01, -1.28016453e01, 2.31279151e00, 7.92487521e-01, 9.69274326e-03],
        M,
        1,
        True,
        [0.03, 0.05],
    ),
    "lumina-next": (
        "lumina_next",
        [393.76566581, -603.50993606, 209.10239044, -23.00726601, 0.86377344],
        M,
        1,
        True,
        [0.2, 0.3, 0.4, 0.5],
    ),
    "lumina-image-2.0-v1": (
        "lumina2",
        [393.76566581, -603.50993606, 209.10239044, -23.00726601, 0.86377344],
        M,
        1,
        True,
        [0.2, 0.3, 0.4, 0.5],
    ),
    "lumina-image-2.0-v2": (
        "lumina2",
        [225.7042019806413, -608.8453716535591, 304.1869942338369, 124.21267720116742, -1.4089066892956552],
        M,
        1,
        True,
        [0.2, 0.3, 0.5, 1.1],
    ),
    "hidream-i1-full": (
        "hidream",
        [-3.13605009e04, -7.12425503e02, 4.91363285e01, 8.26515490e00, 1.08053901e-01],
        T,
        0.1,
        False,
        [0.17, 0.25, 0.3, 0.45],
    ),
    "cogvideox-2b": (
        "cogvideox",
        [-3.10658903e01, 2.54732368e01, -5.92380459e00, 1.75769064e00, -3.61568434e-03],
        T,
        1,
        True,
        [0.1, 0.2],
    ),
    "cogvideox-5b": (
        "cogvideox",
        [-1.53880483e03, 8.43202495e02, -1.34363087e02, 7.97131516e00, -5.23162339e-02],
        T,
        1,
        True,
        [0.1, 0.2],
    ),
    "cogvideox1.5-5b": (
        "cogvideox",
        [2.50210439e02, -1.65061612e02, 3.57804877e01, -7.81551492e-01, 3.58559703e-02],
        T,
        1,
        True,
        [0.1, 0.2, 0.3],
    ),
    "cogvideox1.5-5b-i2v": (
        "cogvideox",
        [1.22842302e02, -1.04088754e02, 2.62981677e01, -3.06009921e-01, 3.71213220e-02],
        T,
        1,
        True,
        [0.1, 0.2, 0.3],
    ),
    "cosmos": (
        "cosmos",
        [2.71156237e02, -9.19775607e01, 2.24437250e00, 2.08355751e00, 1.41776330e-01],
        M,
        1,
        True,
        [0.3, 0.4],
    ),
    "wan2.1-t2v-1.3b": (
        "wan",
        [2.39676752e03, -1.31110545e03, 2.01331979e02, -8.29855975e00, 1.37887774e-01],
        T,
        1,
        True,
        [0.05, 0.07, 0.08],
    ),
    "wan2.1-t2v-1.3b-ret": (
        "wan",
        [-5.21862437e04, 9.23041404e03, -5.28275948e02, 1.36987616e01, -4.99875664e-02],
        P,
        5,
        False,
        [0.05, 0.10],
    ),
    "wan2.1-t2v-14b": (
        "wan",
        [-5784.54975374, 5449.50911966, -1811.16591783, 256.27178429, -13.02252404],
        T,
        1,
        True,
        [0.14, 0.15, 0.2],
    ),
    "wan2.1-t2v-14b-ret": (
        "wan",
        [-3.03318725e05, 4.90537029e04, -2.65530556e03, 5.87365115e01, -3.15583525e-01],
        P,
        5,
        False,
        [0.10, 0.20],
    ),
    "wan2.1-i2v-480p": (
        "wan",
        [-3.02331670e02, 2.23948934e02, -5.25463970e01, 5.87348440e00, -2.01973289e-01],
        T,
        1,
        True,
        [0.13, 0.19, 0.26],
    ),
    "wan2.1-i2v-480p-ret": (
        "wan",
        [2.57151496e05, -3.54229917e04, 1.40286849e03, -1.35890334e01, 1.32517977e-01],
        P,
        5,
        False,
        [0.20, 0.30],
    ),
    "wan2.1-i2v-720p": (
        "wan",
        [-114.36346466, 65.26524496, -18.82220707, 4.91518089, -0.23412683],
        T,
        1,
        True,
        [0.18, 0.2, 0.3],
    ),
    "wan2.1-i2v-720p-ret": (
        "wan",
        [8.10705460e03, 2.13393892e03, -3.72934672e02, 1.66203073e01, -4.17769401e-02],
        P,
        5,
        False,
        [0.20, 0.30],
    ),
    "open-sora-1.2": (
        "open_sora",
        [2.17546007e02, -1.18329252e02, 2.68662585e01, -4.59364272e-02, 4.84426240e-02],
        M,
        1,
        True,
        [0.1, 0.2],
    ),
    "open-sora-plan-v1.1": (
        "open_sora_plan",
        [2.05943668e05, -1.48759286e04, 3.06085986e02, 1.31418080e00, 2.39658469e-03],
        M,
        1,
        True,
        [0.1, 0.2],
    ),
    "latte": (
        "latte",
        [-2.46434137e03, 3.08044764e02, 8.07447667e01, -4.11385132e00, 1.11001402e-01],
        M,
        1,
        True,
        [0.1, 0.2],
    ),
}
#: Families the TeaCache authors integrated outside diffusers: no cachekit adapter applies them.
OUTSIDE_DIFFUSERS = {"lumina_next", "open_sora", "open_sora_plan"}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_equals_the_published_numbers_and_rules(name):
    adapter, coefficients, probe, warmup, last, thresholds = PUBLISHED[name]
    preset = teacache_presets()[name]
    assert preset.adapter == adapter
    assert adapter in registry().adapters or adapter in OUTSIDE_DIFFUSERS  # never a name no adapter has
    assert preset.coefficients == pytest.approx(coefficients, rel=1e-12)
    assert preset.probe == probe
    assert (preset.warmup_share if isinstance(warmup, float) else preset.warmup_steps) == warmup
    assert preset.compute_last_step is last
    assert list(preset.thresholds) == thresholds


def test_every_shipped_preset_is_a_published_one():
    assert sorted(teacache_presets()) == sorted(PUBLISHED)


def _config(model_class, **config):
    return {**{k: v.default for k, v in _defaults(model_class).items()}, **config}


def _defaults(model_class):
    import inspect

    return {
        name: parameter
        for name, parameter in inspect.signature(model_class.__init__).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }


# (adapter, transformer config as the real checkpoints set it, the preset picked or None)
CONFIGS = [
    ("flux", _config(FluxTransformer2DModel, num_layers=19, num_single_layers=38, guidance_embeds=True), "flux-dev"),
    (
        "flux",
        _config(FluxTransformer2DModel, num_layers=19, num_single_layers=38, guidance_embeds=False),
        None,
    ),  # schnell
    ("wan", _config(WanTransformer3DModel, num_layers=30, num_attention_heads=12, in_channels=16), "wan2.1-t2v-1.3b"),
    ("wan", _config(WanTransformer3DModel, num_layers=40, num_attention_heads=40, in_channels=16), "wan2.1-t2v-14b"),
    # Wan2.2-I2V-A14B: the 14B layout with 36 input channels and no image embedder: no published set
    ("wan", _config(WanTransformer3DModel, num_layers=40, num_attention_heads=40, in_channels=36), None),
    # Wan2.2-TI2V-5B
    ("wan", _config(WanTransformer3DModel, num_layers=30, num_attention_heads=24, in_channels=48), None),
    ("cogvideox", _config(CogVideoXTransformer3DModel, num_layers=30, num_attention_heads=30), "cogvideox-2b"),
    ("cogvideox", _config(CogVideoXTransformer3DModel, num_layers=42, num_attention_heads=48), "cogvideox-5b"),
    (
        "cogvideox",
        _config(CogVideoXTransformer3DModel, num_layers=42, num_attention_heads=48, in_channels=32),
        "cogvideox-5b",
    ),
    ("cogvideox", _config(CogVideoXTransformer3DModel, num_layers=42, patch_size_t=2), "cogvideox1.5-5b"),
    (
        "cogvideox",
        _config(CogVideoXTransformer3DModel, num_layers=42, patch_size_t=2, in_channels=32, ofs_embed_dim=512),
        "cogvideox1.5-5b-i2v",
    ),
    (
        "cosmos",
        _config(CosmosTransformer3DModel, num_layers=28, num_attention_heads=32, extra_pos_embed_type="learnable"),
        "cosmos",
    ),
    # Cosmos-Predict2-2B: no published set
    (
        "cosmos",
        _config(CosmosTransformer3DModel, num_layers=28, num_attention_heads=16, extra_pos_embed_type=None),
        None,
    ),
    ("hidream", _config(HiDreamImageTransformer2DModel), "hidream-i1-full"),
]


@pytest.mark.parametrize(("adapter", "config", "expected"), CONFIGS)
def test_auto_pick_matches_on_what_tells_models_apart(adapter, config, expected):
    picked = [preset.name for preset in presets_for(adapter, config)]
    assert picked == ([expected] if expected else [])


def test_alike_configs_are_refused_or_reported():
    """Wan2.1 I2V 480P and 720P share a config: refused, naming both. Lumina-Image-2.0 has two
    published sets for one model: neither is picked. A pick whose config other models share is
    reported."""
    i2v = _config(WanTransformer3DModel, num_layers=40, num_attention_heads=40, in_channels=36, image_dim=1280)
    assert [p.name for p in presets_for("wan", i2v)] == ["wan2.1-i2v-480p", "wan2.1-i2v-720p"]
    assert presets_for("lumina2", {}) == []
    assert teacache_presets()["wan2.1-t2v-14b"].shared_with == "Wan2.2-T2V-A14B's two experts"
    assert "FLUX.1-Kontext-dev" in teacache_presets()["flux-dev"].shared_with
    assert "Dev" in teacache_presets()["hidream-i1-full"].shared_with


def test_a_preset_of_another_family_is_refused():
    from cachekit.testing import tiny_flux_transformer

    model = tiny_flux_transformer()
    with pytest.raises(
        ValueError, match=r"preset 'wan2.1-t2v-1.3b' was made on a 'wan' model, not this FluxTransformer2DModel"
    ):
        cachekit.apply(model, TeaCacheConfig(preset="wan2.1-t2v-1.3b", num_inference_steps=4))
    handle = cachekit.apply(
        model, TeaCacheConfig(preset="flux-dev", num_inference_steps=4, probe="modulated_input", allow_other_model=True)
    )
    handle.remove()
