"""Readable names for class ids. ImageNet and its subsets name their classes by WordNet id (folders such as
n01440764), which is what a checkpoint trained on them stores and checks data against; people watching a camera
want "tench". The ids stay the contract; these names are for output only."""
from __future__ import annotations

# The ten Imagenette classes (ImageNet's synset names, shortened as Imagenette's own documentation does)
WORDNET_NAMES = {
    "n01440764": "tench", "n02102040": "English springer", "n02979186": "cassette player", "n03000684": "chain saw",
    "n03028079": "church", "n03394916": "French horn", "n03417042": "garbage truck", "n03425413": "gas pump",
    "n03445777": "golf ball", "n03888257": "parachute",
}


def readable(class_id: str) -> str:
    """The class's readable name where one is known, else the id itself (CIFAR-10's ids are names already)."""
    return WORDNET_NAMES.get(class_id, class_id)
