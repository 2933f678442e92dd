"""Procedural multi-view renderer: the embedded default dataset (no downloads, deterministic from a seed).

`render_object(seed, res)` gives one object as a MultiViewSample seen from the reference rig;
`write_object(sample, root)` writes it in the reference render-script layout; `render_dataset(out, n)`
renders a whole folder in parallel. CLI: `launcher/synth.py`.
"""

from __future__ import annotations

from datapipes.synth.dataset import render_dataset
from datapipes.synth.object import NORMAL_SPACES, object_id_for_seed, object_seed, render_object
from datapipes.synth.render import ORTHO_SCALE
from datapipes.synth.scene import SynthObject, random_object
from datapipes.synth.writer import FORMATS, is_complete, object_folder, write_object

__all__ = [
    "FORMATS",
    "NORMAL_SPACES",
    "ORTHO_SCALE",
    "SynthObject",
    "is_complete",
    "object_folder",
    "object_id_for_seed",
    "object_seed",
    "random_object",
    "render_dataset",
    "render_object",
    "write_object",
]
