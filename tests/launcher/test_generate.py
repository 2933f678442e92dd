"""launcher/generate.py end to end on a tiny exported model folder (subprocess, like a user runs it)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image

from modeling.components import save_model_folder, tiny_components
from modeling.unet_mv import MVUNet, tiny_unet_config
from tests.modeling.wonder3d_checkpoint import reference_unet, write_wonder3d_model_folder

REPO = Path(__file__).resolve().parents[2]


def _load_script(path: Path) -> ModuleType:
    """Import a launcher script as a module (launcher/ is not a package) without touching sys.path."""
    spec = importlib.util.spec_from_file_location(f"launcher_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate = _load_script(REPO / "launcher" / "generate.py")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("export")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = MVUNet.from_config(tiny_unet_config(num_views=6, cd_attention_mid=True))
    save_model_folder(tiny_components(resolution=64, seed=0), unet, folder)
    return folder


@pytest.fixture(scope="module")
def input_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rgba = np.zeros((50, 40, 4), dtype=np.uint8)
    rgba[10:40, 5:25] = (200, 40, 90, 255)
    path = tmp_path_factory.mktemp("input") / "object.png"
    Image.fromarray(rgba, "RGBA").save(path)
    return path


def test_generate_end_to_end(model_dir: Path, input_png: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["--model", str(model_dir), "--image", str(input_png), "--out", str(out)]
    args += ["--steps", "2", "--guidance", "2.0", "--seed", "5", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, str(REPO / "launcher" / "generate.py"), *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["resolution"] == 64 and len(summary["views"]) == 6
    names = {f"{domain}_{view}.png" for domain in ("normal", "color") for view in generate.VIEW_NAMES}
    assert names | {"input.png", "grid.png"} == {p.name for p in out.iterdir()}
    for name in names:
        with Image.open(out / name) as image:
            assert image.size == (64, 64) and image.mode == "RGB"
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (7 * 64, 2 * 64)  # input + 6 views wide, normals over colors
    input_image = np.asarray(Image.open(out / "input.png"))
    assert (input_image[0, 0] == 255).all() and tuple(input_image[32, 32]) == (200, 40, 90)
    # The same seed in-process gives the same images. Not byte-exact: other tests in this process may change
    # torch's thread count, which reorders float sums; that moves at most a pixel level after rounding.
    again = tmp_path / "again"
    generate.main([*args[:4], "--out", str(again), *args[6:]])
    for name in names:
        first = np.asarray(Image.open(out / name)).astype(int)
        second = np.asarray(Image.open(again / name)).astype(int)
        assert np.abs(first - second).max() <= 1, name


def test_help_and_bad_views(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        generate.parse_args(["--help"])
    text = capsys.readouterr().out
    for option in (
        "--model",
        "--image",
        "--out",
        "--steps",
        "--guidance",
        "--seed",
        "--scheduler",
        "--views",
    ):
        assert option in text
    assert "default: 50" in text
    with pytest.raises(SystemExit, match="unknown or empty view names"):
        generate.parse_views("front,top")
    camera = generate.reference_camera_embeddings(("front", "back"))
    assert camera.shape == (2, 2, 10)
    # embedding = [sin(x), cos(x)] with x[3:5] the domain one-hot: normal [1, 0], color [0, 1]
    one_hot_part = camera[:, 0, [3, 4, 8, 9]]
    expected = torch.tensor([[np.sin(1.0), 0.0, np.cos(1.0), 1.0], [0.0, np.sin(1.0), 1.0, np.cos(1.0)]])
    assert torch.allclose(one_hot_part, expected.float())


def test_generate_loads_a_wonder3d_unet_with_legacy_names(input_png: Path, tmp_path: Path) -> None:
    # The images from a Wonder3D unet/ (legacy weight names, .bin) equal those of the same weights loaded by hand.
    components = tiny_components(resolution=64, seed=0)
    weights = write_wonder3d_model_folder(tmp_path / "wonder3d", components)
    save_model_folder(components, reference_unet(weights), tmp_path / "reference")
    args = [
        "--image",
        str(input_png),
        "--views",
        "front,right",
        "--steps",
        "2",
        "--seed",
        "5",
        "--device",
        "cpu",
    ]
    for name in ("wonder3d", "reference"):
        generate.main(["--model", str(tmp_path / name), "--out", str(tmp_path / f"out_{name}"), *args])
    for view in ("front", "right"):
        for domain in ("normal", "color"):
            got = np.asarray(Image.open(tmp_path / "out_wonder3d" / f"{domain}_{view}.png"))
            expected = np.asarray(Image.open(tmp_path / "out_reference" / f"{domain}_{view}.png"))
            assert got.std() > 0 and np.array_equal(got, expected), (domain, view)


def test_generate_refuses_a_unet_with_an_unexpected_key(
    input_png: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    weights = write_wonder3d_model_folder(tmp_path, tiny_components(resolution=64, seed=0))
    weights["conv_in.extra"] = torch.zeros(1)
    torch.save(weights, tmp_path / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(SystemExit) as exit_info:
        args = ["--model", str(tmp_path), "--image", str(input_png), "--out", str(tmp_path / "out")]
        generate.main([*args, "--views", "front,right", "--steps", "1", "--device", "cpu"])
    assert exit_info.value.code == 2 and not (tmp_path / "out").exists()
    err = capsys.readouterr().err  # earlier lines: the progress bars of saving the fixture
    message = err.strip().splitlines()[-1]
    assert "Traceback" not in err and message.startswith("--model: ")
    assert str(tmp_path) in message and "1 unexpected keys ['conv_in.extra']" in message
