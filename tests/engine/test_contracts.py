"""Training and inference must prepare the CLIP input identically. modeling and datapipes may not import
each other, so each has its own copy of the resize and the CLIP constants; this test holds the copies equal."""

import torch

from datapipes.transform import clip_preprocess
from modeling.components import tiny_components
from modeling.pipeline import MVDiffusionPipeline
from modeling.unet_mv import MVUNet, tiny_unet_config


def test_inference_clip_input_equals_training_clip_input():
    image = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    pipe = MVDiffusionPipeline(MVUNet.from_config(tiny_unet_config()), tiny_components())
    inference = pipe._clip_pixels(image)
    training = torch.stack([clip_preprocess(img, 224) for img in image])
    assert inference.shape == training.shape == (2, 3, 224, 224)
    assert torch.allclose(inference, training, atol=1e-6)
