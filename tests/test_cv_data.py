"""cv.data on tiny copies in the official formats (cv.fixtures), and the sharded loader."""
import pickle

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

from cv.data import (
    CIFAR,
    DATASETS,
    CifarDataset,
    DigitsDataset,
    FlowersDataset,
    load_dataset,
    micro_batch_labels,
    micro_batch_loader,
    read_digits,
    synthetic_dataset,
)
from cv.fixtures import write_cifar_copy, write_flowers_copy


@pytest.mark.parametrize("name, batch_file, first_index", [
    ("cifar10", "data_batch_2", 2),  # 10 training images: 2 per batch file
    ("cifar100", "train", 0),
])
def test_cifar_pixel_layout(tmp_path, name, batch_file, first_index):
    write_cifar_copy(tmp_path, name, num_train=10, num_test=3, seed=0)
    # Official format: a row is 1024 red, 1024 green, 1024 blue values, each row-major 32x32.
    data = np.zeros((2, 3072), dtype=np.uint8)
    data[1, 0 * 1024 + 32 * 0 + 31] = 50   # red, row 0, col 31
    data[1, 1 * 1024 + 32 * 5 + 7] = 200   # green, row 5, col 7
    data[1, 2 * 1024 + 32 * 30 + 2] = 100  # blue, row 30, col 2
    with open(tmp_path / CIFAR[name].folder / batch_file, "wb") as f:
        pickle.dump({"data": data, CIFAR[name].label_key: [3, 7]}, f)
    dataset = CifarDataset(tmp_path, name, "train", transforms.PILToTensor(), verify=False)
    assert len(dataset) == (10 if name == "cifar10" else 2)
    image, label = dataset[first_index + 1]
    assert label == 7 and image.shape == (3, 32, 32) and image.dtype == torch.uint8
    assert (image[0, 0, 31], image[1, 5, 7], image[2, 30, 2]) == (50, 200, 100)
    assert image.sum() == 350
    assert dataset[first_index][1] == 3
    assert len(dataset.classes) == DATASETS[name]


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_load_cifar_with_paper_transforms(tmp_path, name):
    write_cifar_copy(tmp_path, name, num_train=6, num_test=3, seed=1)
    train = load_dataset(name, tmp_path, "train", image_size=40, verify=False)
    test = load_dataset(name, tmp_path, "test", image_size=40, verify=False)
    assert (len(train), len(test)) == (6, 3)
    for image, label in (train[0], test[2]):
        assert image.shape == (3, 40, 40) and image.dtype == torch.float32
        assert 0 <= label < DATASETS[name]
    assert isinstance(train.transform.transforms[0], transforms.RandomResizedCrop)
    assert test.transform.transforms[0].size == 45  # int(40 * 256 / 224)


def test_flowers_reader(tmp_path):
    folder = write_flowers_copy(tmp_path, num_images=9, seed=0)
    labels = scipy.io.loadmat(folder / "imagelabels.mat")["labels"].ravel()
    set_ids = scipy.io.loadmat(folder / "setid.mat")
    first = int(set_ids["trnid"].ravel()[0])
    pixels = np.zeros((48, 64, 3), dtype=np.uint8)
    pixels[:, :32, 0] = 255  # left half red, right half blue
    pixels[:, 32:, 2] = 255
    Image.fromarray(pixels).save(folder / "jpg" / f"image_{first:05d}.jpg", quality=95)
    train = FlowersDataset(tmp_path, "train", transforms.PILToTensor(), verify=False)
    assert [p.name for p in train.paths] == [
        f"image_{int(i):05d}.jpg" for i in set_ids["trnid"].ravel()]
    assert train.labels == [int(labels[int(i) - 1]) - 1 for i in set_ids["trnid"].ravel()]
    image, label = train[0]
    assert image.shape == (3, 48, 64) and label == labels[first - 1] - 1
    assert image[0, 24, 8] > 245 and image[1, 24, 8] < 10 and image[2, 24, 8] < 10
    assert image[2, 24, 56] > 245 and image[0, 24, 56] < 10
    test = load_dataset("flowers102", tmp_path, "test", image_size=32, verify=False)
    assert len(test) == len(set_ids["tstid"].ravel()) == 3
    assert test[1][0].shape == (3, 32, 32)


def test_md5_mismatch_names_the_file(tmp_path):
    write_cifar_copy(tmp_path, "cifar10", num_train=5, num_test=1, seed=0)
    with pytest.raises(RuntimeError, match=r"md5 mismatch for .*cifar-10-batches-py/data_batch_1"
                       r": got [0-9a-f]{32}, expected c99cafc152244af753f735de768cd75f .*"
                       r"only generated test copies \(cv\.fixtures\) may be loaded with "
                       r"verify=False"):
        load_dataset("cifar10", tmp_path, "train", 32)
    write_flowers_copy(tmp_path, num_images=3, seed=0)
    with pytest.raises(RuntimeError, match=r"md5 mismatch for .*flowers-102/imagelabels\.mat"):
        load_dataset("flowers102", tmp_path, "train", 32)


def test_missing_files_name_path_and_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"CIFAR file not found: .*cifar-100-python/test\. "
                       r"Expected layout: <data_dir>/cifar-100-python/\{train,test,meta\}"):
        load_dataset("cifar100", tmp_path, "test", 32)
    with pytest.raises(FileNotFoundError, match=r"Flowers-102 file not found: .*imagelabels\.mat"
                       r"\. Expected layout: <data_dir>/flowers-102/\{jpg/image_00001\.jpg"):
        load_dataset("flowers102", tmp_path, "train", 32)
    folder = write_flowers_copy(tmp_path, num_images=6, seed=0)
    first = int(scipy.io.loadmat(folder / "setid.mat")["tstid"].ravel()[0])
    (folder / "jpg" / f"image_{first:05d}.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=rf"Flowers-102 image not found: .*image_"
                       rf"{first:05d}\.jpg \(1 of the 2 test images are missing\)"):
        load_dataset("flowers102", tmp_path, "test", 32, verify=False)


def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'imagenet': valid names are "
                       "cifar10, cifar100, flowers102"):
        load_dataset("imagenet", tmp_path, "train", 224)
    with pytest.raises(ValueError, match="unknown split 'val': valid splits are train, test"):
        load_dataset("cifar10", tmp_path, "val", 224)
    with pytest.raises(ValueError, match="data_dir is None .* use synthetic_dataset"):
        load_dataset("cifar10", None, "train", 224)
    with pytest.raises(ValueError, match="synthetic_dataset: num_classes must be a positive "
                       "int, got 0"):
        synthetic_dataset(4, 32, 0, seed=0)
    dataset = synthetic_dataset(10, 8, 3, seed=0)
    with pytest.raises(ValueError, match="replica 2 is out of range for 2 replicas"):
        micro_batch_loader(dataset, 2, replica=2, num_replicas=2, seed=0, epoch=0)
    with pytest.raises(ValueError, match="10 samples cannot fill one micro-batch of 4 on each "
                       "of 3 replicas: lower micro_batch_size or use more data"):
        micro_batch_loader(dataset, 4, replica=0, num_replicas=3, seed=0, epoch=0)


class _Indices(Dataset):
    def __init__(self, n):
        self.labels = list(range(n))

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return torch.tensor(float(i)), i


def _indices(loader):
    return [labels.tolist() for _, labels in loader]


def test_shards_are_disjoint_and_reproducible():
    dataset = _Indices(50)

    def shards(**kwargs):
        args = dict(seed=7, epoch=0, drop_last=True) | kwargs
        return [_indices(micro_batch_loader(dataset, 4, r, 3, **args)) for r in range(3)]

    full = shards()
    assert [len(s) for s in full] == [4, 4, 4]  # 50 // (3 * 4) micro-batches each
    assert all(len(batch) == 4 for s in full for batch in s)
    flat = [i for s in full for batch in s for i in batch]
    assert len(flat) == len(set(flat)) == 48
    assert shards() == full
    assert shards(epoch=1) != full and shards(seed=8) != full
    every = shards(drop_last=False)
    assert sorted(i for s in every for batch in s for i in batch) == list(range(50))
    assert shards(shuffle=False)[1][0] == [1, 4, 7, 10]
    for r in range(3):
        labels = micro_batch_labels(dataset, 4, r, 3, seed=7, epoch=0)
        assert [b.tolist() for b in labels] == full[r]


def test_augmentations_reproducible_across_workers(tmp_path):
    write_cifar_copy(tmp_path, "cifar10", num_train=12, num_test=1, seed=0)
    dataset = load_dataset("cifar10", tmp_path, "train", image_size=32, verify=False)
    state = torch.get_rng_state()
    inline = list(micro_batch_loader(dataset, 3, 1, 2, seed=0, epoch=0))
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    workers = list(micro_batch_loader(dataset, 3, 1, 2, seed=0, epoch=0, num_workers=2))
    assert len(inline) == len(workers) == 2
    for (a, la), (b, lb) in zip(inline, workers):
        assert torch.equal(a, b) and torch.equal(la, lb)
    # The same sample gets other crops in another epoch.
    tagged = _TaggedAugmented(dataset)
    epoch0 = {int(t): x for xs, ts in micro_batch_loader(tagged, 12, 0, 1, seed=0, epoch=0)
              for x, t in zip(xs, ts)}
    epoch1 = {int(t): x for xs, ts in micro_batch_loader(tagged, 12, 0, 1, seed=0, epoch=1)
              for x, t in zip(xs, ts)}
    assert all(not torch.equal(epoch0[i], epoch1[i]) for i in range(12))


class _TaggedAugmented(Dataset):
    """The dataset's augmented image with the sample's index as its label."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i][0], i


def test_synthetic_dataset():
    dataset = synthetic_dataset(20, 16, 5, seed=3)
    image, label = dataset[4]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and 0 <= label < 5
    assert torch.equal(synthetic_dataset(20, 16, 5, seed=3)[4][0], image)
    assert not torch.equal(synthetic_dataset(20, 16, 5, seed=4)[4][0], image)
    assert set(dataset.labels) <= set(range(5))
    images, labels = next(iter(micro_batch_loader(dataset, 4, 0, 1, seed=0, epoch=0)))
    assert images.shape == (4, 3, 16, 16) and labels.shape == (4,)


def test_digits_reader():
    """scikit-learn's digits: real 8x8 images of 17 grey levels; a fixed, stratified,
    disjoint 4:1 split; normalised, upscaled, 3 channels; the same on every load."""
    pixels, labels = read_digits()
    assert pixels.shape == (1797, 64) and labels.shape == (1797,)
    assert set(np.unique(pixels)) <= set(range(17)) and sorted(set(labels.tolist())) == list(range(10))
    train, test = (load_dataset("digits", None, split, 32) for split in ("train", "test"))
    assert (len(train), len(test)) == (1438, 359) and DATASETS["digits"] == 10
    for c in range(10):
        assert test.labels.count(c) == round(int((labels == c).sum()) / 5)
        assert train.labels.count(c) + test.labels.count(c) == int((labels == c).sum())
    rows = {tuple(row) for row in train.images.reshape(len(train), -1).tolist()}
    assert sum(tuple(row) in rows for row in test.images.reshape(len(test), -1).tolist()) <= 5  # duplicates in the data only
    assert abs(float(train.images.mean())) < 1e-6 and abs(float(train.images.std()) - 1) < 1e-3
    image, label = test[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and isinstance(label, int)
    assert torch.equal(image[0], image[1]) and torch.equal(test[0][0], DigitsDataset("test", 32)[0][0])
    assert torch.equal(DigitsDataset("train", 16).images, train.images)


def test_digits_augmentation_is_a_small_shift():
    train = DigitsDataset("train", 8)
    torch.manual_seed(0)
    shifted = {tuple(train[3][0][0].flatten().tolist()) for _ in range(30)}
    assert 2 <= len(shifted) <= 9                 # shifts of -1, 0, 1 pixels in x and y
    loader = micro_batch_loader(train, 16, 0, 1, seed=0, epoch=0)
    again = micro_batch_loader(train, 16, 0, 1, seed=0, epoch=0)
    assert torch.equal(next(iter(loader))[0], next(iter(again))[0])
