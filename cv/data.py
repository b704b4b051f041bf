"""Image data for the ResNeXt experiments: CIFAR-10/100, Oxford Flowers-102, digits, synthetic.

Files are read in their official layouts under one `data_dir` (the same root torchvision
uses); nothing is downloaded:

* CIFAR-10: `cifar-10-batches-py/{data_batch_1..data_batch_5,test_batch,batches.meta}`,
* CIFAR-100: `cifar-100-python/{train,test,meta}` (the 100 `fine_labels`),
* Flowers-102: `flowers-102/{jpg/image_00001.jpg..,imagelabels.mat,setid.mat}`;
  split "train" = `trnid`, "test" = `tstid` (the paper's use; `valid` is not used).

`digits` needs no `data_dir`: scikit-learn's handwritten digits (1797 real 8x8 grey
images, 10 classes), read from the data file the scikit-learn package ships (installed
without its dependencies, never imported; see `DigitsDataset`).

Integrity: with `verify=True` (the default) every CIFAR file and the two Flowers `.mat`
files must match the official md5 sums (torchvision's); `verify=False` exists for the tiny
generated copies of `cv.fixtures` only. Flowers images are not checksummed.

Samples are (image, label): image a float tensor (3, image_size, image_size) after the
paper's transforms (`paper_transform`), label an int in [0, num_classes).

`micro_batch_loader` gives every data-parallel replica a disjoint shard, in the same order
on every rank of that replica, reproducible from (seed, epoch): each sample's random
augmentation draws from torch's generator seeded by (seed, epoch, sample index), so the
result does not depend on `num_workers` and the caller's global RNG is left untouched.
"""
import hashlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from wpipe.train.shard import replica_share

DATASETS = {"cifar10": 10, "cifar100": 100, "flowers102": 102, "digits": 10}
"""Dataset name -> number of classes."""

SPLITS = ("train", "test")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class CifarLayout:
    folder: str
    train: tuple[tuple[str, str], ...]
    """(file name, md5) of the training batches, in order."""
    test: tuple[tuple[str, str], ...]
    meta: tuple[str, str]
    label_key: str
    names_key: str
    layout: str
    """The expected layout, for error messages."""


CIFAR = {
    "cifar10": CifarLayout(
        "cifar-10-batches-py",
        (("data_batch_1", "c99cafc152244af753f735de768cd75f"),
         ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
         ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
         ("data_batch_4", "634d18415352ddfa80567beed471001a"),
         ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb")),
        (("test_batch", "40351d587109b95175f43aff81a1287e"),),
        ("batches.meta", "5ff9c542aee3614f3951f8cda6e48888"),
        "labels", "label_names",
        "<data_dir>/cifar-10-batches-py/{data_batch_1..data_batch_5,test_batch,batches.meta} "
        "(cifar-10-python.tar.gz extracted in data_dir)"),
    "cifar100": CifarLayout(
        "cifar-100-python",
        (("train", "16019d7e3df5f24257cddd939b257f8d"),),
        (("test", "f0ef6b0ae62326f3e7ffdfab6717acfc"),),
        ("meta", "7973b15100ade9c7d40fb424638fde48"),
        "fine_labels", "fine_label_names",
        "<data_dir>/cifar-100-python/{train,test,meta} "
        "(cifar-100-python.tar.gz extracted in data_dir)"),
}

FLOWERS_FOLDER = "flowers-102"
FLOWERS_MD5 = {"imagelabels.mat": "e0620be6f572b9609742df49c70aed4d",
               "setid.mat": "a5357ecc9cb78c4bef273ce3793fc85c"}
FLOWERS_SPLIT_KEYS = {"train": "trnid", "test": "tstid"}
_FLOWERS_LAYOUT = ("<data_dir>/flowers-102/{jpg/image_00001.jpg..jpg/image_08189.jpg,"
                   "imagelabels.mat,setid.mat} (102flowers.tgz extracted in flowers-102/)")


def paper_transform(split: str, image_size: int) -> transforms.Compose:
    """The paper's transforms. train: RandomResizedCrop + horizontal flip; test: resize the
    short side to image_size * 256/224, center crop. Both end with ImageNet normalisation."""
    if split == "train":
        steps = [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip()]
    else:
        steps = [transforms.Resize(int(image_size * 256 / 224)),
                 transforms.CenterCrop(image_size)]
    return transforms.Compose(
        steps + [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def load_dataset(name: str, data_dir: str | os.PathLike, split: str, image_size: int,
                 verify: bool = True) -> Dataset:
    """`split` of dataset `name` under `data_dir`, with the paper's transforms at
    `image_size` px (square side). See the module docstring for layouts and `verify`."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: valid names are {', '.join(DATASETS)}")
    _check_split(split)
    if data_dir is None and name != "digits":
        raise ValueError(f"data_dir is None for dataset {name!r}: pass the folder that holds "
                         "the files, or use synthetic_dataset for runs without data")
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int (px), got {image_size!r}")
    if name == "digits":
        return DigitsDataset(split, image_size)
    transform = paper_transform(split, image_size)
    if name == "flowers102":
        return FlowersDataset(data_dir, split, transform, verify)
    return CifarDataset(data_dir, name, split, transform, verify)


class CifarDataset(Dataset):
    """CIFAR-10/100 from the python pickles. `images` uint8 (N, 32, 32, 3) HWC RGB,
    `labels` list of ints, `classes` the names from the meta file."""

    def __init__(self, data_dir, name: str, split: str, transform=None, verify: bool = True):
        if name not in CIFAR:
            raise ValueError(f"unknown CIFAR dataset {name!r}: valid names are {', '.join(CIFAR)}")
        layout = CIFAR[name]
        _check_split(split)
        folder = Path(data_dir) / layout.folder
        images, self.labels = [], []
        for file_name, md5 in layout.train if split == "train" else layout.test:
            entry = _read_cifar_pickle(folder / file_name, md5, layout, verify)
            if "data" not in entry or layout.label_key not in entry:
                raise ValueError(f"{folder / file_name} lacks the keys 'data' and "
                                 f"{layout.label_key!r} of a {name} batch")
            images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels = [int(label) for label in entry[layout.label_key]]
            outside = [label for label in labels if not 0 <= label < DATASETS[name]]
            if outside:
                raise ValueError(f"{folder / file_name}: label {outside[0]} is outside the {DATASETS[name]} "
                                 f"classes of {name} (0 .. {DATASETS[name] - 1}): is it a {name} file?")
            self.labels += labels
        # Rows are 1024 R, 1024 G, 1024 B values, each channel row-major: to HWC for PIL.
        self.images = np.ascontiguousarray(np.concatenate(images).transpose(0, 2, 3, 1))
        self.classes = list(_read_cifar_pickle(folder / layout.meta[0], layout.meta[1], layout,
                                               verify)[layout.names_key])
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.images[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index]


def _read_cifar_pickle(path: Path, md5: str, layout: CifarLayout, verify: bool) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR file not found: {path}. Expected layout: {layout.layout}")
    if verify:
        _check_md5(path, md5)
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as error:
        raise ValueError(f"{path} is not a CIFAR python pickle ({type(error).__name__}: {error}); "
                         f"replace it with the file from the official archive") from None
    if not isinstance(entry, dict):
        raise ValueError(f"{path} holds a {type(entry).__name__}, not the dict of a CIFAR batch")
    return entry


class FlowersDataset(Dataset):
    """Oxford Flowers-102: `paths` of the split's JPEG files, `labels` in [0, 102)."""

    def __init__(self, data_dir, split: str, transform=None, verify: bool = True):
        _check_split(split)
        folder = Path(data_dir) / FLOWERS_FOLDER
        mats = {}
        for file_name, md5 in FLOWERS_MD5.items():
            path = folder / file_name
            if not path.is_file():
                raise FileNotFoundError(
                    f"Flowers-102 file not found: {path}. Expected layout: {_FLOWERS_LAYOUT}")
            if verify:
                _check_md5(path, md5)
            mats[file_name] = scipy.io.loadmat(path)
        labels = np.asarray(mats["imagelabels.mat"]["labels"]).ravel().astype(np.int64)
        ids = np.asarray(mats["setid.mat"][FLOWERS_SPLIT_KEYS[split]]).ravel().astype(np.int64)
        if labels.size == 0 or labels.min() < 1 or labels.max() > 102:
            raise ValueError(f"{folder / 'imagelabels.mat'}: 'labels' must hold 1..102")
        if ids.size == 0 or ids.min() < 1 or ids.max() > labels.size:
            raise ValueError(f"{folder / 'setid.mat'}: {FLOWERS_SPLIT_KEYS[split]!r} must hold "
                             f"1-based image ids in 1..{labels.size}")
        self.paths = [folder / "jpg" / f"image_{i:05d}.jpg" for i in ids]
        missing = [p for p in self.paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"Flowers-102 image not found: {missing[0]} ({len(missing)} of the "
                f"{len(self.paths)} {split} images are missing). Expected layout: "
                f"{_FLOWERS_LAYOUT}")
        self.labels = [int(labels[i - 1]) - 1 for i in ids]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        with Image.open(self.paths[index]) as f:
            image = f.convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index]


class DigitsDataset(Dataset):
    """scikit-learn's handwritten digits: 1797 8x8 images of 17 grey levels, 10 classes.

    A fixed stratified split: per class, a seeded permutation (seed 0) holds out
    round(count / 5) images for "test", 359 in all; "train" has the other 1438. Images
    are scaled to [0, 1], normalised with the training pixels' mean and standard
    deviation, upscaled to image_size (bilinear) and repeated to 3 channels. Training
    images are shifted by up to one original pixel in each direction (zero padding), the
    only augmentation: these are 8x8 glyphs.
    """

    HELD_OUT = 5     # one in HELD_OUT of every class is a test image

    def __init__(self, split: str, image_size: int):
        _check_split(split)
        pixels, labels = read_digits()
        test = np.zeros(len(labels), dtype=bool)
        rng = np.random.default_rng(0)
        for c in range(10):
            members = np.flatnonzero(labels == c)
            test[rng.permutation(members)[:round(len(members) / self.HELD_OUT)]] = True
        keep = test if split == "test" else ~test
        train_pixels = pixels[~test] / 16.0
        self.mean, self.std = float(train_pixels.mean()), float(train_pixels.std())
        self.images = torch.from_numpy((pixels[keep] / 16.0 - self.mean) / self.std).float().reshape(-1, 1, 8, 8)
        self.labels = labels[keep].tolist()
        self.split, self.image_size = split, image_size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.split == "train":
            dx, dy = torch.randint(-1, 2, (2,)).tolist()
            padded = torch.nn.functional.pad(image, (1, 1, 1, 1), value=(0 - self.mean) / self.std)
            image = padded[:, 1 + dy:9 + dy, 1 + dx:9 + dx]
        image = torch.nn.functional.interpolate(image[None], size=(self.image_size, self.image_size),
                                                mode="bilinear", align_corners=False)[0]
        return image.expand(3, -1, -1).contiguous(), self.labels[index]


def read_digits() -> tuple[np.ndarray, np.ndarray]:
    """(pixels float64 (1797, 64) in 0..16, labels int64 (1797,)) from scikit-learn's
    `datasets/data/digits.csv.gz`, located without importing scikit-learn."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("dataset digits reads scikit-learn's data file, and scikit-learn is not "
                                "installed: pip install -r requirements.txt")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: scikit-learn's digits data file is missing")
    table = np.loadtxt(path, delimiter=",")
    if table.shape != (1797, 65):
        raise ValueError(f"{path}: expected 1797 rows of 64 pixels and a label, got shape {table.shape}")
    return table[:, :64], table[:, 64].astype(np.int64)


class SyntheticDataset(Dataset):
    """Random images (3, image_size, image_size) float32: unit normal noise plus a
    per-class colour offset (so a network can learn them), labels uniform in
    [0, num_classes). Sample i is a pure function of (seed, i)."""

    def __init__(self, num_samples: int, image_size: int, num_classes: int, seed: int):
        for field, value in (("num_samples", num_samples), ("image_size", image_size),
                             ("num_classes", num_classes)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"synthetic_dataset: {field} must be a positive int, "
                                 f"got {value!r}")
        generator = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(num_classes, (num_samples,), generator=generator).tolist()
        self.offsets = torch.randn(num_classes, 3, 1, 1, generator=generator)
        self.image_size, self.seed = image_size, seed

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        generator = torch.Generator().manual_seed(_derive_seed(self.seed, index))
        noise = torch.randn(3, self.image_size, self.image_size, generator=generator)
        return noise + self.offsets[self.labels[index]], self.labels[index]


def synthetic_dataset(num_samples: int, image_size: int, num_classes: int,
                      seed: int) -> SyntheticDataset:
    """Synthetic stand-in for runs without data (throughput, CPU quick-starts)."""
    return SyntheticDataset(num_samples, image_size, num_classes, seed)


def micro_batch_loader(dataset: Dataset, micro_batch_size: int, replica: int,
                       num_replicas: int, seed: int, epoch: int, num_workers: int = 0,
                       shuffle: bool = True, drop_last: bool = True, pin_memory: bool = False) -> DataLoader:
    """Micro-batches (images, labels) of data-parallel replica `replica` for one epoch.

    The epoch's order is a permutation from (seed, epoch) (identity if not `shuffle`), dealt
    to the replicas in turn, so shards are disjoint. drop_last=True: every replica gets the
    same number of full micro-batches, floor(len / (num_replicas * micro_batch_size)).
    drop_last=False: every sample is used exactly once; a replica's last micro-batch may be
    short and replica counts may differ by one (for evaluation). `num_workers` decoding
    processes do not change the result; `pin_memory` (on CUDA) lets the GPU copy without
    the host waiting.
    """
    indices = _shard(len(dataset), micro_batch_size, replica, num_replicas, seed, epoch,
                     shuffle, drop_last)
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
    return DataLoader(
        _SeededSamples(dataset, seed, epoch), batch_size=micro_batch_size, sampler=indices,
        num_workers=num_workers, drop_last=drop_last, pin_memory=pin_memory,
        # The loader draws worker base seeds from this generator, not the global RNG.
        generator=torch.Generator().manual_seed(_derive_seed(seed, epoch, replica)))


def micro_batch_labels(dataset: Dataset, micro_batch_size: int, replica: int,
                       num_replicas: int, seed: int, epoch: int, shuffle: bool = True,
                       drop_last: bool = True) -> list[torch.Tensor]:
    """The labels `micro_batch_loader` would yield with the same arguments, without
    decoding an image (for pipeline ranks that need only the targets). Needs
    `dataset.labels`, which every dataset of this module has."""
    indices = _shard(len(dataset), micro_batch_size, replica, num_replicas, seed, epoch,
                     shuffle, drop_last)
    labels = torch.tensor([dataset.labels[i] for i in indices], dtype=torch.int64)
    return list(labels.split(micro_batch_size))  # with drop_last, shards are whole batches


class _SeededSamples(Dataset):
    def __init__(self, dataset: Dataset, seed: int, epoch: int):
        self.dataset, self.seed, self.epoch = dataset, seed, epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(_derive_seed(self.seed, self.epoch, index))
            return self.dataset[index]


def _shard(num_samples, micro_batch_size, replica, num_replicas, seed, epoch, shuffle,
           drop_last) -> list[int]:
    if shuffle:
        order = torch.randperm(num_samples,
                               generator=torch.Generator().manual_seed(_derive_seed(seed, epoch)))
    else:
        order = torch.arange(num_samples)
    return replica_share(order, micro_batch_size, replica, num_replicas, drop_last).tolist()


def _derive_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from non-negative ints (e.g. seed, epoch, index)."""
    return int(np.random.SeedSequence(values).generate_state(1, np.uint64)[0] >> np.uint64(1))


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: valid splits are {', '.join(SPLITS)}")


def _check_md5(path: Path, expected: str) -> None:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise RuntimeError(
            f"md5 mismatch for {path}: got {digest.hexdigest()}, expected {expected} (the "
            f"official release). Re-extract the official archive; only generated test copies "
            f"(cv.fixtures) may be loaded with verify=False")
