"""Adapter specs that are wrong are refused by name, as early as can be known, saying what is allowed."""

from __future__ import annotations

import pytest
import torch
from bad_input import FLUX_BLOCKS, V, declare

import cachekit
from cachekit.errors import (
    AlreadyAttachedError,
    MissingPointError,
    UnsupportedModelError,
)
from cachekit.schemas import (
    AdapterSpec,
    TeaCacheConfig,
)
from cachekit.schemas.adapter import LatentSpec

CASES = [
    (
        "spec name",
        lambda t: AdapterSpec(name="My DiT", blocks=[FLUX_BLOCKS]),
        V,
        r"name\n.*String should match pattern '\^\[a-z\]\[a-z0-9_\]\*\$'",
    ),
    (
        "spec returns a position the block does not return",
        lambda t: AdapterSpec(
            name="x",
            blocks=[
                {**FLUX_BLOCKS, "streams": [FLUX_BLOCKS["streams"][0], {"name": "b", "position": 1}], "returns": [2, 0]}
            ],
        ),
        V,
        r"'returns' \[2, 0\] must give each stream its own position in the returned tuple, 0 to 1",
    ),
    (
        "spec returns a tuple where the block returns a tensor",
        lambda t: cachekit.BlockStreams(((0, "hidden_states"),), (0,)).read_outputs(torch.zeros(2, 3)),
        UnsupportedModelError,
        r"a block returned a Tensor, but its adapter says it returns a tuple of its 1 streams \(at \[0\]\): leave "
        r"a spec's 'returns' unset",
    ),
    (
        "spec returns a tensor where the block returns a tuple",
        lambda t: cachekit.BlockStreams(((0, "hidden_states"),)).read_outputs((torch.zeros(2, 3), torch.zeros(2, 3))),
        UnsupportedModelError,
        r"a block returned a tuple, but its adapter says it returns its one stream as a tensor: give the position",
    ),
    (
        "spec streams without returns",
        lambda t: AdapterSpec(name="x", blocks=[{**FLUX_BLOCKS, "streams": [FLUX_BLOCKS["streams"][0]] * 2}]),
        V,
        r"a block carrying 2 streams must say where it returns each",
    ),
    (
        "spec returns count",
        lambda t: AdapterSpec(name="x", blocks=[{**FLUX_BLOCKS, "returns": [0, 1]}]),
        V,
        r"'returns' has 2 entries for 1 streams",
    ),
    (
        "spec probe given and missing",
        lambda t: AdapterSpec(name="x", blocks=[FLUX_BLOCKS], probe={"kind": "norm"}, missing={"probe": "none"}),
        V,
        r"'probe' is both given and listed as missing",
    ),
    (
        "spec kind present and missing",
        lambda t: AdapterSpec(
            name="x", blocks=[{**FLUX_BLOCKS, "attention": {"attn": "spatial"}}], missing_attention={"spatial": "no"}
        ),
        V,
        r"attention kind 'spatial' is both declared on a block list and listed as missing",
    ),
    (
        "spec unknown point",
        lambda t: AdapterSpec(name="x", blocks=[FLUX_BLOCKS], missing={"probes": "x"}),
        V,
        r"missing\.probes\.\[key\]\n.*'span', 'attention', 'mlp', 'probe'",
    ),
    (
        "spec latent ids without packed layout",
        lambda t: LatentSpec(ids={"name": "img_ids"}),
        V,
        r"ids and grid lay out packed tokens; give layout 'BNC' or 'BTNC'",
    ),
    (
        "spec block list that is not there",
        lambda t: declare(blocks=[{**FLUX_BLOCKS, "path": "blockz"}]),
        ValueError,
        r"VariantFlux has no block list 'blockz'; its children are .*transformer_blocks",
    ),
    (
        "spec attention path no block has",
        lambda t: declare(blocks=[{**FLUX_BLOCKS, "attention": {"atn": "spatial"}}]),
        ValueError,
        r"no block of 'transformer_blocks' has a module 'atn'",
    ),
    (
        "spec timestep argument not a parameter",
        lambda t: declare(timestep={"argument": {"name": "t", "position": 3}}),
        ValueError,
        r"timestep argument 't' is not a parameter of VariantFlux\.forward; its parameters: hidden_states",
    ),
    (
        "spec argument at the wrong position",
        lambda t: declare(timestep={"argument": {"name": "timestep", "position": 1}}),
        ValueError,
        r"timestep argument 'timestep' is parameter 3 of VariantFlux\.forward, not 1",
    ),
    (
        "spec embedding module not there",
        lambda t: declare(timestep_embedding={"module": "time_embed"}),
        ValueError,
        r"has no signal module 'time_embed'; its children are .*time_text_embed",
    ),
    (
        "spec probe norm not there",
        lambda t: declare(probe={"kind": "norm", "module": "norm0"}),
        ValueError,
        r"has no probe norm of the first block 'norm0'",
    ),
    (
        "spec probe table not a tensor",
        lambda t: declare(probe={"kind": "table", "table": "modulation", "embedding": {"name": "temb", "position": 2}}),
        ValueError,
        r"the probe's table 'modulation' is not a tensor of the first block",
    ),
    (
        "spec file that does not parse",
        lambda t: (t / "s.toml").write_text("name = ") and cachekit.declare_adapter(t / "s.toml", torch.nn.Module),
        ValueError,
        r"s\.toml: not a valid TOML table",
    ),
    (
        "probe the adapter lacks",
        lambda t: cachekit.apply(
            declare(probe=None, missing={"probe": "not modulated"}).model,
            TeaCacheConfig(coefficients=[1, 0], rel_l1_thresh=0.1, num_inference_steps=4),
        ),
        (MissingPointError, AlreadyAttachedError),
        r"needs the 'probe' point, which the 'flux_variant' adapter does not provide .*not modulated|already",
    ),
]


@pytest.mark.parametrize(("make", "error", "message"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_is_named(tmp_path, fresh_registry, make, error, message):
    with pytest.raises(error, match=rf"(?s){message}"):
        make(tmp_path)


def test_the_table_keeps_its_cases():
    assert len(CASES) >= 16  # the table the bad-input tests were split from held 77 cases in all
