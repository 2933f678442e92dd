"""Map-style dataset over render folders (like the reference's mvds.py), for small data and debugging.

Reads a render root in either layout of `datapipes.render_folder`, decodes with the same code as the shard
reader (`render_folder.decode_raw_object`) and uses the same per-object augmentation RNG
(`stream_state.example_rng(seed, epoch, object_id)`), so an object gives the same example tensors from a
folder as from a shard. Batches are those of `datapipes.transform.collate`.

    loader = build_folder_loader("renders/", batch_size=4, rank=0, world_size=1, seed=0,
                                 transform=TransformOptions(), workers=2)
    for epoch in range(3):
        loader.sampler.set_epoch(epoch); loader.dataset.set_epoch(epoch)
        for batch in loader: ...
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, Dataset, DistributedSampler

from datapipes.render_folder import (
    ObjectRef,
    decode_raw_object,
    list_objects,
    read_object,
    resolve_layout,
    split_of,
)
from datapipes.sample import VIEW_NAMES, MultiViewSample, SampleError
from datapipes.stream_state import example_rng
from datapipes.transform import TransformOptions, collate, make_example


class FolderDataset(Dataset):
    """One example (batch keys, unbatched) per object folder.

    Args:
        root: render root folder.
        transform: TransformOptions for `make_example`.
        layout: "auto", "wonder3d" or "render-script".
        seed: base of the per-object augmentation RNG.
        split: None for every object, or "train"/"val" by the converter's object-id hash with `val_fraction`.
        validate: read every object once now and leave out the invalid ones (listed in `self.skipped` as
            (object_id, reason)); otherwise a bad object raises SampleError when it is loaded.
    """

    def __init__(
        self,
        root: str | Path,
        transform: TransformOptions,
        layout: str = "auto",
        seed: int = 0,
        split: str | None = None,
        val_fraction: float = 0.01,
        validate: bool = False,
    ) -> None:
        objects = list_objects(root)
        self.layout = resolve_layout(root, layout, objects)
        if split is not None:
            objects = [ref for ref in objects if split_of(ref.object_id, val_fraction) == split]
        self.skipped: list[tuple[str, str]] = []
        if validate:
            objects = [ref for ref in objects if self._is_valid(ref)]
        self.objects: list[ObjectRef] = objects
        self.transform, self.seed, self.epoch = transform, seed, 0

    def _is_valid(self, ref: ObjectRef) -> bool:
        try:
            read_object(ref, self.layout, VIEW_NAMES)
        except SampleError as error:
            self.skipped.append((ref.object_id, str(error)))
            return False
        return True

    def set_epoch(self, epoch: int) -> None:
        """Change the augmentation RNG stream (background draws) for a new epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.objects)

    def sample(self, index: int) -> MultiViewSample:
        """The decoded MultiViewSample of object `index`."""
        # Headers only: decode_raw_object decodes (and so checks) the pixels of the views it takes next.
        raw = read_object(self.objects[index], self.layout, VIEW_NAMES, full_decode=False)
        return decode_raw_object(raw, self.transform.views)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.sample(index)
        return make_example(sample, self.transform, example_rng(self.seed, self.epoch, sample.object_id))


def build_folder_loader(
    root: str | Path,
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    transform: TransformOptions,
    workers: int = 2,
    shuffle: bool = True,
    drop_last: bool = True,
    layout: str = "auto",
    split: str | None = None,
    val_fraction: float = 0.01,
) -> DataLoader:
    """DataLoader of batches over a render root, split over ranks by DistributedSampler.

    No process group is needed: rank and world size are passed explicitly. With drop_last every rank gets
    len(dataset) // (world_size * batch_size) batches (the sampler pads or trims to equal rank shares).
    """
    dataset = FolderDataset(root, transform, layout=layout, seed=seed, split=split, val_fraction=val_fraction)
    sampler = DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        drop_last=drop_last,
    )
