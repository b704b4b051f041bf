"""Tiny copies of the datasets in their official file formats, from a seed.

For tests and CPU quick-starts, where the real files are absent. The copies do not match
the official md5 sums: load them with `cv.data.load_dataset(..., verify=False)`.
"""
import pickle
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

from cv.data import CIFAR, DATASETS, FLOWERS_FOLDER


def write_cifar_copy(root, name: str, num_train: int, num_test: int, seed: int) -> Path:
    """Write `<root>/cifar-10-batches-py/` (name "cifar10") or `<root>/cifar-100-python/`
    ("cifar100") with random 32x32 images and labels; return that folder. CIFAR-10's
    training images are spread over its five batch files like the original's."""
    if name not in CIFAR:
        raise ValueError(f"unknown CIFAR dataset {name!r}: valid names are {', '.join(CIFAR)}")
    layout, rng = CIFAR[name], np.random.default_rng(seed)
    folder = Path(root) / layout.folder
    folder.mkdir(parents=True, exist_ok=True)
    for files, total in ((layout.train, num_train), (layout.test, num_test)):
        for (file_name, _), count in zip(files, _spread(total, len(files))):
            entry = {
                "batch_label": file_name,
                "data": rng.integers(0, 256, (count, 3 * 32 * 32), dtype=np.uint8),
                layout.label_key: rng.integers(0, DATASETS[name], count).tolist(),
                "filenames": [f"image_{i}.png" for i in range(count)],
            }
            if name == "cifar100":
                entry["coarse_labels"] = rng.integers(0, 20, count).tolist()
            _write_pickle(folder / file_name, entry)
    meta = {layout.names_key: [f"class_{i}" for i in range(DATASETS[name])]}
    if name == "cifar100":
        meta["coarse_label_names"] = [f"superclass_{i}" for i in range(20)]
    _write_pickle(folder / layout.meta[0], meta)
    return folder


def write_flowers_copy(root, num_images: int, seed: int) -> Path:
    """Write `<root>/flowers-102/` with `num_images` random JPEGs of varied sizes (40-80
    px a side), `imagelabels.mat` (labels 1..102) and `setid.mat` (the ids, 1-based, dealt
    in turn to trnid, valid, tstid after a shuffle); return that folder."""
    if num_images < 3:
        raise ValueError(f"write_flowers_copy needs num_images >= 3 (one per split), "
                         f"got {num_images}")
    rng = np.random.default_rng(seed)
    folder = Path(root) / FLOWERS_FOLDER
    (folder / "jpg").mkdir(parents=True, exist_ok=True)
    for i in range(1, num_images + 1):
        height, width = rng.integers(40, 81, 2)
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "jpg" / f"image_{i:05d}.jpg", quality=90)
    # The official files hold (1, n) double arrays.
    labels = rng.integers(1, 103, num_images).astype(np.float64)
    scipy.io.savemat(folder / "imagelabels.mat", {"labels": labels[None, :]})
    ids = rng.permutation(num_images) + 1
    scipy.io.savemat(folder / "setid.mat", {key: ids[k::3][None, :].astype(np.float64)
                                            for k, key in enumerate(("trnid", "valid", "tstid"))})
    return folder


def _spread(total: int, parts: int) -> list[int]:
    return [len(chunk) for chunk in np.array_split(np.arange(total), parts)]


def _write_pickle(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the protocol of the original Python 2 pickles
