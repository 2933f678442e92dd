"""Fixtures for datapipes tests: tiny synthetic objects in memory and as a render-script folder.

- `synth_samples`: 4 MultiViewSamples at 32² (reference rig, camera-frame normals, like the real data);
- `synth_render_root`: the same 4 objects written in the render-script layout (PNG) under a temp folder;
- `tiny_transform_options`: TransformOptions at 32² with a 32² CLIP input, white background.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from datapipes.sample import MultiViewSample
from datapipes.synth import object_seed, render_object
from datapipes.synth.dataset import render_dataset
from datapipes.transform import TransformOptions

SYNTH_RES = 32
SYNTH_OBJECTS = 4
SYNTH_SEED = 0


@pytest.fixture(scope="session")
def synth_samples() -> list[MultiViewSample]:
    """4 rendered objects at 32², object i = render_object(object_seed(0, i), 32)."""
    return [render_object(object_seed(SYNTH_SEED, index), SYNTH_RES) for index in range(SYNTH_OBJECTS)]


@pytest.fixture(scope="session")
def synth_render_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A render-script folder `{root}/{uid[:2]}/{uid}/...` of the same 4 objects (treat as read-only)."""
    root = tmp_path_factory.mktemp("synth_render")
    render_dataset(root, SYNTH_OBJECTS, res=SYNTH_RES, seed=SYNTH_SEED, workers=1)
    return root


@pytest.fixture
def tiny_transform_options() -> TransformOptions:
    return TransformOptions(resolution=SYNTH_RES, num_views=6, background="white", clip_size=32)
