"""MNIST, Fashion-MNIST, SVHN, CelebA and image folders, each read from a tiny set in its exact on-disk format."""
import gzip

import numpy as np
import pytest
import torch
from PIL import Image

from bench import UserError
from bench.datasets import ImageFiles, image_size, load_dataset, parse_dataset


def write_idx_images(path, images: np.ndarray, gz: bool):
    """The idx3-ubyte format: 0x00000803, then N, rows, cols as big-endian int32, then the uint8 pixels."""
    header = np.array([0x00000803, *images.shape], dtype=">i4").tobytes()
    data = header + images.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def write_idx_labels(path, n: int):
    path.write_bytes(np.array([0x00000801, n], dtype=">i4").tobytes() + bytes(n))


@pytest.mark.parametrize("name, folder, gz",
                         [("mnist", "MNIST/raw", False), ("fashion-mnist", "FashionMNIST/raw", True)])
def test_idx_datasets_are_padded_to_32_and_repeated_to_rgb(name, folder, gz, tmp_path):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, size=(30, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 256, size=(10, 28, 28), dtype=np.uint8)
    write_idx_images(tmp_path / folder / "train-images-idx3-ubyte", train, gz)
    write_idx_images(tmp_path / folder / "t10k-images-idx3-ubyte", test, gz)
    write_idx_labels(tmp_path / folder / "train-labels-idx1-ubyte", 30)  # present as in the real set, unused
    splits = load_dataset(name, tmp_path)
    assert splits.test.shape == (10, 3, 32, 32) and splits.test.dtype == torch.uint8
    assert (len(splits.train), len(splits.val)) == (27, 3)  # a fixed seeded tenth held out
    for c in range(3):  # every channel is the gray image, shifted by the 2-pixel zero border
        assert torch.equal(splits.test[:, c, 2:30, 2:30], torch.from_numpy(test))
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (splits.test[:, :, border] == 0).all()
    both = torch.cat([splits.train, splits.val])[:, 0, 2:30, 2:30]
    assert sorted(x.numpy().tobytes() for x in both) == sorted(x.tobytes() for x in train)  # a partition


def test_idx_file_with_a_wrong_header_is_rejected(tmp_path):
    write_idx_images(tmp_path / "MNIST/raw/train-images-idx3-ubyte", np.zeros((2, 28, 28)), gz=False)
    (tmp_path / "MNIST/raw/t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x01" + bytes(20))
    with pytest.raises(UserError, match="unreadable"):
        load_dataset("mnist", tmp_path)


def test_svhn_reads_the_mat_format_pixel_for_pixel(tmp_path):
    from scipy.io import savemat

    rng = np.random.default_rng(1)
    folder = tmp_path / "svhn"
    folder.mkdir()
    x_train = rng.integers(0, 256, size=(32, 32, 3, 40), dtype=np.uint8)
    x_test = rng.integers(0, 256, size=(32, 32, 3, 7), dtype=np.uint8)
    savemat(folder / "train_32x32.mat", {"X": x_train, "y": rng.integers(1, 11, size=(40, 1)).astype(np.uint8)})
    savemat(folder / "test_32x32.mat", {"X": x_test, "y": rng.integers(1, 11, size=(7, 1)).astype(np.uint8)})
    splits = load_dataset("svhn", tmp_path)
    assert splits.test.shape == (7, 3, 32, 32) and (len(splits.train), len(splits.val)) == (36, 4)
    # X[row, col, channel, image] -> images[image, channel, row, col]
    assert splits.test[5, 2, 3, 30].item() == x_test[3, 30, 2, 5]
    assert torch.equal(splits.test, torch.from_numpy(x_test).permute(3, 2, 0, 1))


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "svhn", "celeba"])
def test_missing_data_names_data_root_and_download(name, tmp_path):
    with pytest.raises(UserError) as error:
        load_dataset(name, tmp_path)
    assert "--data-root" in str(error.value) and "--download" in str(error.value)


# --- CelebA -------------------------------------------------------------------------------------------------------

def celeba_face(top_green: bool) -> Image.Image:
    """178x218 like img_align_celeba: red outside the centre 140x140 square; inside, the top half green and the
    bottom half blue (or the other way round), so a crop, resize or orientation error shows."""
    array = np.zeros((218, 178, 3), dtype=np.uint8)
    array[...] = (255, 0, 0)
    top, left = (218 - 140) // 2, (178 - 140) // 2
    first, second = ((0, 255, 0), (0, 0, 255)) if top_green else ((0, 0, 255), (0, 255, 0))
    array[top:top + 70, left:left + 140] = first
    array[top + 70:top + 140, left:left + 140] = second
    return Image.fromarray(array)


def write_celeba(root, n=12):
    folder = root / "celeba" / "img_align_celeba"
    folder.mkdir(parents=True)
    lines = []
    for i in range(1, n + 1):
        name = f"{i:06d}.jpg"
        celeba_face(top_green=i % 2 == 1).save(folder / name, quality=100, subsampling=0)  # 4:4:4, no chroma blur
        lines.append(f"{name} {0 if i <= n // 2 else (1 if i <= 3 * n // 4 else 2)}")
    (root / "celeba" / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")


def test_celeba_follows_the_partition_file_and_crops_the_centre(tmp_path):
    write_celeba(tmp_path)
    splits = load_dataset("celeba", tmp_path)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 3, 3)
    assert isinstance(splits.train, ImageFiles) and splits.train.shape == (6, 3, 128, 128)
    first = splits.train[0].int()  # 000001.jpg: green on top
    assert first.shape == (3, 128, 128) and first.dtype == torch.int32
    # no red: everything outside the centre 140x140 is cut away (JPEG blurs the colour edge by a pixel or two)
    assert first[0, 2:-2, 2:-2].max() < 40 and first[0].float().mean() < 5
    assert first[1, :60].float().mean() > 230 and first[2, :60].float().mean() < 25  # top: green
    assert first[2, 68:].float().mean() > 230 and first[1, 68:].float().mean() < 25  # bottom: blue
    second = splits.train[1].int()  # 000002.jpg: the other way round
    assert second[2, :60].float().mean() > 230


def test_celeba_size_option_and_missing_images(tmp_path):
    write_celeba(tmp_path)
    assert load_dataset("celeba@64", tmp_path).test[:2].shape == (2, 3, 64, 64)
    (tmp_path / "celeba" / "img_align_celeba" / "000003.jpg").unlink()
    with pytest.raises(UserError, match="000003.jpg"):
        load_dataset("celeba", tmp_path)


# --- image folders ------------------------------------------------------------------------------------------------

def write_pngs(folder, n, size=(40, 36), offset=0):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pixels = np.full((size[1], size[0], 3), (i + offset) % 256, dtype=np.uint8)  # its number as its colour
        Image.fromarray(pixels).save(folder / f"{i:04d}.png")


def test_image_folder_is_split_by_name_hashing_deterministically_and_disjointly(tmp_path):
    write_pngs(tmp_path / "faces", 60)
    a, b = load_dataset(f"imagefolder@16:{tmp_path / 'faces'}"), load_dataset(f"imagefolder@16:{tmp_path / 'faces'}")
    sizes = (len(a.train), len(a.val), len(a.test))
    assert sizes == (51, 3, 6)  # 10% test, 5% validation
    assert a.train.files == b.train.files and a.test.files == b.test.files
    names = a.train.files + a.val.files + a.test.files
    assert len(set(names)) == 60
    assert a.test.files != sorted(names)[:6]  # hashed, not the first files by name
    assert a.test[0:6].shape == (6, 3, 16, 16) and a.test.dtype == torch.uint8


def test_image_folder_resizes_the_shorter_side_and_crops_the_centre(tmp_path):
    array = np.zeros((48, 96, 3), dtype=np.uint8)
    array[...] = (0, 0, 200)
    array[:, :8] = (255, 0, 0)  # a red strip at the left edge: outside the centre square after resizing to 32
    folder = tmp_path / "one"
    write_pngs(folder, 20, size=(96, 48))
    Image.fromarray(array).save(folder / "0000.png")
    splits = load_dataset(f"imagefolder@32:{folder}")
    files = splits.train.files + splits.val.files + splits.test.files
    split = next(s for s in (splits.train, splits.val, splits.test) if str(folder / "0000.png") in s.files)
    image = split[split.files.index(str(folder / "0000.png"))]
    assert image.shape == (3, 32, 32) and len(files) == 20
    assert (image[0] <= 2).all() and (image[2] >= 198).all()  # the strip is gone, the rest keeps its colour


def test_image_folder_uses_train_val_test_subfolders(tmp_path):
    for split, n in (("train", 10), ("val", 3), ("test", 4)):
        write_pngs(tmp_path / "set" / split, n)
    splits = load_dataset("imagefolder:set", tmp_path)  # a relative folder is looked up under --data-root
    assert (len(splits.train), len(splits.val), len(splits.test)) == (10, 3, 4)
    assert image_size("imagefolder:set") == 256 and splits.test[:1].shape == (1, 3, 256, 256)


def test_imagenet_layout_val_folder_is_the_test_split(tmp_path):
    write_pngs(tmp_path / "imagenet" / "train" / "n01", 30)
    write_pngs(tmp_path / "imagenet" / "train" / "n02", 30, offset=100)
    write_pngs(tmp_path / "imagenet" / "val" / "n01", 5)
    splits = load_dataset(f"imagefolder@8:{tmp_path / 'imagenet'}")
    assert len(splits.test) == 5 and all("/val/" in f for f in splits.test.files)
    assert (len(splits.train), len(splits.val)) == (57, 3)  # validation carved out of train/, disjoint
    assert not set(splits.train.files) & set(splits.val.files)


def test_image_files_index_like_a_tensor(tmp_path):
    write_pngs(tmp_path / "flat", 12, size=(8, 8))
    files = sorted(str(p) for p in (tmp_path / "flat").iterdir())
    split = ImageFiles(files, lambda image: np.asarray(image).transpose(2, 0, 1), 8)
    batch = split[torch.tensor([3, 0, 3])]
    assert batch.shape == (3, 3, 8, 8) and batch[:, 0, 0, 0].tolist() == [3, 0, 3]  # order kept, repeats allowed
    assert split[2:5][:, 1, 4, 4].tolist() == [2, 3, 4] and split[7][0, 0, 0].item() == 7
    assert len(split) == 12 and split.shape == (12, 3, 8, 8) and split.to("cpu").device.type == "cpu"
    assert split[10:10].shape == (0, 3, 8, 8)
    split.prefetch(torch.tensor([5, 1]))  # decoded in the background, handed over by the matching request
    assert split[torch.tensor([5, 1])][:, 2, 0, 0].tolist() == [5, 1]
    split.prefetch(torch.tensor([6]))
    assert split[torch.tensor([9])][0, 0, 0, 0].item() == 9  # a different request is decoded afresh


def test_dataset_names_are_checked(tmp_path):
    assert parse_dataset("imagefolder@128:/data/ffhq").size == 128 and image_size("celeba@64") == 64
    for bad, message in (("nope", "unknown dataset"), ("cifar10@64", "fixed size"), ("imagefolder", "needs a folder"),
                         ("celeba@x", "positive integer"), ("mnist:/x", "takes no :PATH")):
        with pytest.raises(UserError, match=message):
            parse_dataset(bad)
    with pytest.raises(UserError, match="does not exist"):
        load_dataset(f"imagefolder:{tmp_path / 'missing'}")
    write_pngs(tmp_path / "two", 2)
    with pytest.raises(UserError, match="too few"):
        load_dataset(f"imagefolder:{tmp_path / 'two'}")
