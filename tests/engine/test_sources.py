"""model.pretrained / model.unet as Hugging Face hub ids, resolved offline from a hub cache the test builds.

huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when it is imported, so the runs happen in a fresh
interpreter with those variables set, as a user's run would.
"""

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from engine.config import ConfigError
from engine.sources import resolve_pretrained
from tests.engine.pretrained_folder import hub_snapshot, write_tiny_pretrained
from tests.engine.runs import env
from tests.modeling.wonder3d_checkpoint import write_wonder3d_unet

PRETRAINED_ID, WONDER3D_ID = "tiny-org/tiny-image-variations", "tiny-org/tiny-wonder3d"

# Builds the run's components and UNet from hub ids, the way engine.train.setup does; prints what it got.
BUILD = """
import json, sys
from engine.build import build_components, build_unet
from engine.config import ConfigError, load_config
from engine.sources import resolve_pretrained
base = ["run.dir=unused", "data.resolution=32"]
cfg = load_config(None, [*base, "model.pretrained=" + sys.argv[1]])
components, unet = build_components(cfg), build_unet(cfg)
stage2 = build_unet(load_config(None, [*base, "model.unet=" + sys.argv[2], "model.num_views=2",
                                       "data.views=[front,right]"]))
try:
    resolve_pretrained("tiny-org/not-in-the-cache")
    missing = None
except ConfigError as error:
    missing = str(error)
print(json.dumps({"pretrained": str(resolve_pretrained(sys.argv[1])), "missing": missing,
                  "vae_conv_in": components.vae.encoder.conv_in.weight.sum().item(),
                  "unet_conv_in": unet.conv_in.weight[:, :4].sum().item(),
                  "stage2_conv_in": stage2.conv_in.weight.sum().item()}))
"""


@pytest.fixture
def hf_home(tmp_path):
    home = tmp_path / "hf_home"
    write_tiny_pretrained(hub_snapshot(home, PRETRAINED_ID))
    write_wonder3d_unet(hub_snapshot(home, WONDER3D_ID) / "unet")
    return home


def test_hub_ids_resolve_offline_from_the_hub_cache(hf_home, tmp_path):
    run_env = {k: v for k, v in env().items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    run_env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-c", BUILD, PRETRAINED_ID, WONDER3D_ID],
        env=run_env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    snapshot = hf_home / "hub" / "models--tiny-org--tiny-image-variations" / "snapshots"
    assert os.path.samefile(got["pretrained"], next(snapshot.iterdir()))
    files = snapshot / next(snapshot.iterdir())
    vae = load_file(files / "vae" / "diffusion_pytorch_model.safetensors")
    unet_2d = load_file(files / "unet" / "diffusion_pytorch_model.safetensors")
    assert got["vae_conv_in"] == pytest.approx(vae["encoder.conv_in.weight"].sum().item(), rel=1e-6)
    assert got["unet_conv_in"] == pytest.approx(unet_2d["conv_in.weight"].sum().item(), rel=1e-6)
    assert got["stage2_conv_in"] != 0.0
    # Not cached while offline: one line naming the key and why, no download attempt.
    assert got["missing"].startswith("model.pretrained: tiny-org/not-in-the-cache")
    assert "HF_HUB_OFFLINE" in got["missing"] and "\n" not in got["missing"]


def test_a_missing_local_folder_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^model\.unet: .*nowhere does not exist"):
        resolve_pretrained(str(tmp_path / "nowhere"), key="model.unet")
    assert resolve_pretrained(str(tmp_path)) == tmp_path
