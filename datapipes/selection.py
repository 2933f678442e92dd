"""Which objects a conversion takes: the reference dataset's ``object_list.json`` / ``invalid_list.json``.

Wonder3D trains on the ids of its object list minus those of its invalid list. Both files are JSON lists of
strings; an entry may be a bare uid or a path to the ``.glb`` it was rendered from, and the reference keeps
only its base name without ``.glb`` -- so do we, so that its files work unchanged.

An id of the object list that the source does not hold is an error unless `allow_missing` is set: the point
of the list is to convert exactly the reference's objects, and a partial render would otherwise train on a
different set without anyone noticing. Exclude-list ids absent from the source are only counted (the
reference's invalid list covers all of Objaverse, and excluding an absent object changes nothing).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datapipes.render_folder import ObjectRef

SHOWN_IDS = 5  # ids quoted in a one-line error


class SelectionError(ValueError):
    """An object or exclude list is unusable (the message names the file and the problem)."""


@dataclass(frozen=True)
class IdList:
    """The normalised ids of one list file, in file order without repeats."""

    path: str
    ids: tuple[str, ...]

    def digest(self) -> str:
        """sha256 of the ids: a resumed conversion must use the same list, wherever the file lives."""
        return hashlib.sha256("\n".join(sorted(self.ids)).encode("utf-8")).hexdigest()


@dataclass
class Selection:
    """The objects a conversion takes and the counts its report shows."""

    objects: list[ObjectRef]
    report: dict[str, Any] = field(default_factory=dict)


def normalise_id(entry: str) -> str:
    """'objs/000-001/abc.glb' -> 'abc': the reference's rule (base name, ``.glb`` removed)."""
    name = posixpath.basename(entry.replace("\\", "/"))
    return name[: -len(".glb")] if name.endswith(".glb") else name


def read_id_list(path: str | Path, option: str) -> IdList:
    """Read a JSON list of object ids; raises SelectionError naming `option` and the file."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise SelectionError(f"{option} {path}: cannot read: {error.strerror or error}") from error
    except ValueError as error:
        raise SelectionError(f"{option} {path}: not valid JSON: {error}") from error
    if not isinstance(entries, list) or not all(isinstance(e, str) and e.strip() for e in entries):
        raise SelectionError(f"{option} {path}: must be a JSON list of object id strings")
    ids = tuple(dict.fromkeys(normalise_id(e.strip()) for e in entries))
    return IdList(str(path), ids)


def select_objects(
    objects: list[ObjectRef],
    include: IdList | None,
    exclude: IdList | None,
    allow_missing: bool = False,
) -> Selection:
    """Keep the objects of `include` (all when None) minus those of `exclude`, in the source's id order.

    Raises SelectionError when `include` names ids the source lacks (unless `allow_missing`).
    """
    present = {ref.object_id for ref in objects}
    report: dict[str, Any] = {"source_objects": len(objects)}
    wanted = present
    if include is not None:
        missing = [oid for oid in include.ids if oid not in present]
        if missing and not allow_missing:
            raise SelectionError(
                f"--object-list {include.path}: {len(missing)} of {len(include.ids)} ids are not in the "
                f"source, e.g. {missing[:SHOWN_IDS]}; render them, remove them, or pass --allow-missing"
            )
        wanted = set(include.ids) & present
        report.update(object_list=include.path, listed=len(include.ids), missing_from_source=len(missing))
        report["missing_examples"] = missing[:SHOWN_IDS]
    if exclude is not None:
        dropped = set(exclude.ids) & wanted
        wanted = wanted - dropped
        report.update(exclude_list=exclude.path, excluded=len(dropped))
        report["exclude_ids_not_in_source"] = len(set(exclude.ids) - present)
    selected = [ref for ref in objects if ref.object_id in wanted]
    report["selected"] = len(selected)
    return Selection(selected, report)
