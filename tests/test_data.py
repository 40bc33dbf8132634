import json
import os
import pickle
import re
import time

import numpy as np
import pytest
import torch
from PIL import Image

from hdkdlib import data as D, models
from hdkdlib.data import splits
from hdkdlib.data.folder import read_image
from hdkdlib.paths import atomic_write_text


def _arrays(n, k, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8), rng.integers(0, k, size=n)


@pytest.mark.parametrize("name,k", [("cifar100", 100), ("cifar10", 10)])
def test_cifar_round_trip_is_exact(tmp_path, name, k):
    train, test = _arrays(230, k, 1), _arrays(40, k, 2)
    base = D.write_fake_cifar(tmp_path, name, train=train, test=test)
    assert base.name == {"cifar100": "cifar-100-python", "cifar10": "cifar-10-batches-py"}[name]
    x, y, classes = D.load_cifar(tmp_path, name, train=True)
    assert x.dtype == torch.uint8 and x.shape == (230, 3, 32, 32) and len(classes) == k
    assert np.array_equal(x.numpy(), train[0]) and np.array_equal(y.numpy(), train[1])
    xt, yt, _ = D.load_cifar(tmp_path, name, train=False)
    assert np.array_equal(xt.numpy(), test[0]) and np.array_equal(yt.numpy(), test[1])


def test_fake_cifar_has_the_real_file_layout(tmp_path):
    from torchvision.datasets import CIFAR10
    base = D.write_fake_cifar(tmp_path, "cifar10", n_train=50, n_test=10)
    assert sorted(p.name for p in base.iterdir()) == sorted([f for f, _ in CIFAR10.train_list + CIFAR10.test_list]
                                                            + ["batches.meta", D.cifar.FAKE_MANIFEST])
    with open(base / "data_batch_1", "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    assert entry["data"].dtype == np.uint8 and entry["data"].shape[1] == 3072 and isinstance(entry["labels"], list)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_fake_data_carries_its_classes_into_the_test_split(tmp_path, name):
    """What a quick run learns on the fake training images holds on the fake test images: a nearest-class-mean
    rule fitted on the training split classifies the test split (image folders: the val split)."""
    def nearest_mean_accuracy(x, y, xt, yt):
        x, xt = x.float().mean((2, 3)), xt.float().mean((2, 3))  # each image's mean colour
        means = torch.stack([x[y == c].mean(0) for c in range(int(y.max()) + 1)])
        return (torch.cdist(xt, means).argmin(1) == yt).float().mean().item()

    k = D.CIFAR_SPECS[name]["num_classes"]
    D.write_fake_cifar(tmp_path, name, n_train=6 * k, n_test=2 * k)
    (x, y, _), (xt, yt, _) = D.load_cifar(tmp_path, name), D.load_cifar(tmp_path, name, train=False)
    assert nearest_mean_accuracy(x, y, xt, yt) > 0.9
    root = D.write_fake_image_folder(tmp_path / "folder", classes=[f"n{i}" for i in range(10)], n_per_class=(6, 2))
    (x, y, _), (xt, yt, _) = D.folder_to_tensor(root, "train"), D.folder_to_tensor(root, "val")
    assert nearest_mean_accuracy(x, y, xt, yt) > 0.9


def test_fake_cifar_is_never_written_over_a_real_copy(tmp_path):
    """Over real files its manifest would make the loader accept the fakes as the real data: refused, untouched;
    over its own fakes it writes again."""
    base = D.write_fake_cifar(tmp_path, "cifar10", n_train=50, n_test=10)
    D.write_fake_cifar(tmp_path, "cifar10", n_train=50, n_test=10, seed=1)  # fakes over fakes
    (base / D.cifar.FAKE_MANIFEST).unlink()  # now like a real download
    before = {p.name: p.read_bytes() for p in base.iterdir()}
    with pytest.raises(FileExistsError, match=r"cifar-10-batches-py holds cifar10 files that no fake writer wrote"):
        D.write_fake_cifar(tmp_path, "cifar10", n_train=50, n_test=10)
    assert {p.name: p.read_bytes() for p in base.iterdir()} == before


def test_fake_cifar_is_never_written_over_an_official_file_beside_a_manifest(tmp_path, monkeypatch):
    """A stopped write leaves a manifest; official files copied in beside it are still never written over (here
    the test batch stands in for an official one: the release's MD5s are made its own)."""
    base = D.write_fake_cifar(tmp_path, "cifar10", n_train=50, n_test=10)
    official = {**D.cifar._expected_md5(tmp_path, "cifar10"), "test_batch": D.cifar._md5(base / "test_batch")}
    monkeypatch.setattr(D.fake, "_expected_md5", lambda root, name: official)
    before = {p.name: p.read_bytes() for p in base.iterdir()}
    with pytest.raises(FileExistsError, match=r"test_batch is the official cifar10 file: fake data is never written"):
        D.write_fake_cifar(tmp_path, "cifar10", n_train=50, n_test=10, seed=1)
    assert {p.name: p.read_bytes() for p in base.iterdir()} == before


def test_a_fake_cifar_write_stopped_half_way_is_refused_by_the_loader_and_written_again(tmp_path, monkeypatch):
    """Stopped after its batch files but before its manifest: no loader takes the half-written copy, and the
    quick notebooks' resolve_data writes it again instead of refusing its folder for good."""
    from hdkdlib import notebook
    monkeypatch.setenv("HDKD_RUNS", str(tmp_path / "runs"))
    calls = []

    def stop_at_the_manifest(path, text):
        calls.append(path.name)
        if len(calls) == 2:  # the first call writes the empty manifest, the second the one listing the files
            raise KeyboardInterrupt
        return atomic_write_text(path, text)

    monkeypatch.setattr(D.fake, "atomic_write_text", stop_at_the_manifest)
    with pytest.raises(KeyboardInterrupt):
        notebook.resolve_data("cifar10", "auto", epochs=1)
    base = D.cifar.folder(tmp_path / "runs" / "fake-data" / "cifar10", "cifar10")
    assert (base / "test_batch").is_file() and (base / D.cifar.FAKE_MANIFEST).read_text() == "{}"
    with pytest.raises(D.DatasetError, match="is not the official CIFAR file"):
        D.load_cifar(base.parent, "cifar10")
    monkeypatch.setattr(D.fake, "atomic_write_text", atomic_write_text)
    quick = notebook.resolve_data("cifar10", "auto", epochs=1)
    assert len(D.load_cifar(quick["data_root"], "cifar10")[1]) == 60


@pytest.mark.parametrize("manifest", ["[]", '"x"', "3", '{"data_batch_1": 3}'])
def test_a_fake_manifest_of_another_shape_is_refused_in_one_line(tmp_path, manifest):
    base = D.write_fake_cifar(tmp_path, "cifar10", n_train=50, n_test=10)
    (base / D.cifar.FAKE_MANIFEST).write_text(manifest)
    with pytest.raises(D.DatasetError, match=r"hdkdlib-fake-manifest.json is not a \{file name: MD5\} object: delete"):
        D.load_cifar(tmp_path, "cifar10")


def test_missing_dataset_names_the_path_and_the_fix(tmp_path, monkeypatch):
    with pytest.raises(D.DatasetError, match=r"cifar-100-python/train.*download=True.*cifar-100-python.tar.gz"):
        D.load_cifar(tmp_path, "cifar100")

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr("hdkdlib.data.cifar.download_and_extract_archive", offline)
    monkeypatch.setattr("hdkdlib.data.cifar.time.sleep", lambda s: None)
    with pytest.raises(D.DatasetError, match=r"could not download cifar100 from https://.*attempt 3: OSError: network "
                                             r"unreachable.*unpack it into"):
        D.load_cifar(tmp_path, "cifar100", download_if_missing=True)


def test_damaged_cifar_files_are_named(tmp_path):
    base = D.write_fake_cifar(tmp_path, "cifar100", n_train=100, n_test=10)
    raw = (base / "train").read_bytes()
    (base / "train").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(D.DatasetError, match=r"cifar-100-python/train is not the official CIFAR file .*download again"):
        D.load_cifar(tmp_path, "cifar100")
    _relist(base, "train")  # listed as our own file: now it is read, and found truncated
    with pytest.raises(D.DatasetError, match=r"cannot read .*cifar-100-python/train.*download again"):
        D.load_cifar(tmp_path, "cifar100")
    with open(base / "train", "wb") as f:
        pickle.dump({"data": np.zeros((4, 100), np.uint8), "fine_labels": [0, 1, 2, 3]}, f)
    _relist(base, "train")
    with pytest.raises(D.DatasetError, match=r"cifar-100-python/train: data shaped \(4, 100\)"):
        D.load_cifar(tmp_path, "cifar100")


@pytest.mark.parametrize("entry, message", [
    ({"data": np.zeros((4, 3072), np.uint8), "fine_labels": [0.6, 1.6, 2.6, 3.6]},  # a cast would truncate
     r"train: the labels are float64 shaped \(4,\), not a list of integer class indices"),
    ({"data": np.zeros((4, 3072), np.uint8), "fine_labels": [[0], [1], [2], [3]]},  # would fail at the first step
     r"train: the labels are int64 shaped \(4, 1\), not a list of integer class indices"),
    ({"data": np.zeros((4, 3072), np.uint8), "fine_labels": ["a", "b", "c", "d"]}, r"train: the labels are <U1"),
    (7, r"train has no 'data'/'fine_labels' entries: not a cifar100 batch file"),
])
def test_cifar_labels_and_entries_are_checked_before_any_cast(tmp_path, entry, message):
    base = D.write_fake_cifar(tmp_path, "cifar100", n_train=100, n_test=10)
    with open(base / "train", "wb") as f:
        pickle.dump(entry, f)
    _relist(base, "train")
    with pytest.raises(D.DatasetError, match=message):
        D.load_cifar(tmp_path, "cifar100")


def test_a_cifar_meta_file_without_class_names_is_named(tmp_path):
    base = D.write_fake_cifar(tmp_path, "cifar100", n_train=100, n_test=10)
    with open(base / "meta", "wb") as f:
        pickle.dump({"coarse_label_names": []}, f)
    _relist(base, "meta")
    with pytest.raises(D.DatasetError, match=r"meta has no 'fine_label_names' list: not cifar100's meta file"):
        D.load_cifar(tmp_path, "cifar100")


@pytest.mark.parametrize("dtype, scale, offset, message", [
    (np.float32, 1 / 255, 0, r"pixels are float32 in 0..1, which look like \[0, 1\] floats; CIFAR pixels are integers "
                             r"0..255: multiply them by 255, round, and write the file again with uint8 pixels"),
    (np.float64, 1, 0, r"pixels are float64 in 0..255; CIFAR pixels are integers 0..255: write the file again"),
    (np.int16, 1, -5, r"pixels are int16 in -5..250, outside the 0..255 of 8-bit pixels; map them into 0..255"),
    (np.uint16, 1, 45, r"pixels are uint16 in 45..300, outside the 0..255 of 8-bit pixels"),
    (np.bool_, 1, 0, r"pixels are bool, not integers"),
], ids=["float-0-1", "float-0-255", "int16", "uint16", "bool"])
def test_cifar_pixels_are_checked_before_the_cast_to_uint8(tmp_path, dtype, scale, offset, message):
    """[0, 1] floats cast to uint8 were two grey levels, int16 outside 0..255 wrapped around: refused, by file."""
    train, test = _arrays(60, 10, 1), _arrays(20, 10, 2)
    train[0][0, 0, 0, :2] = (0, 255)
    bad = (train[0].astype(np.float64) * scale + offset).astype(dtype)
    D.write_fake_cifar(tmp_path, "cifar10", train=(bad, train[1]), test=test)
    with pytest.raises(D.DatasetError, match=rf"^\S*cifar-10-batches-py/data_batch_1: {message}.*"
                                             r"hdkdlib.data.write_fake_cifar does"):
        D.load_cifar(tmp_path, "cifar10")
    D.write_fake_cifar(tmp_path, "cifar10", train=train, test=test)  # the fix the message gives
    x, _, _ = D.load_cifar(tmp_path, "cifar10")
    assert np.array_equal(x.numpy(), train[0])


def test_cifar_pixels_of_a_wider_integer_type_in_range_load_exactly(tmp_path):
    train, test = _arrays(60, 10, 1), _arrays(20, 10, 2)
    D.write_fake_cifar(tmp_path, "cifar10", train=(train[0].astype(np.int64), train[1]), test=test)
    x, y, _ = D.load_cifar(tmp_path, "cifar10")
    assert x.dtype == torch.uint8 and np.array_equal(x.numpy(), train[0]) and np.array_equal(y.numpy(), train[1])


def _relist(base, name):
    """Enter a file's current MD5 in the fake-data manifest (as write_fake_cifar does for its own files)."""
    manifest = json.loads((base / D.cifar.FAKE_MANIFEST).read_text())
    manifest[name] = D.cifar._md5(base / name)
    (base / D.cifar.FAKE_MANIFEST).write_text(json.dumps(manifest))


class _Payload:
    """Unpickling this runs os.system(command): what a tampered CIFAR file could carry."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        import os
        return os.system, (self.command,)


@pytest.mark.parametrize("target", ["meta", "train"])
@pytest.mark.parametrize("listed", [False, True])
def test_cifar_files_carrying_code_cannot_run_it(tmp_path, target, listed):
    """A meta or batch file with a payload: refused by its MD5, and, even when listed in a forged manifest, by
    the restricted unpickler. Training on it fails with a clear error; the payload's marker file never appears."""
    base = D.write_fake_cifar(tmp_path / "data", "cifar100", n_train=100, n_test=20)
    marker = tmp_path / "payload-ran"
    with open(base / target, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    entry["payload"] = _Payload(f"touch {marker}")
    with open(base / target, "wb") as f:
        pickle.dump(entry, f, protocol=2)
    if listed:
        _relist(base, target)
    message = "refusing to load the global posix.system" if listed else "is not the official CIFAR file"
    with pytest.raises(D.DatasetError, match=message):
        D.load_cifar(tmp_path / "data", "cifar100")
    from hdkdlib.train import main
    code = main(["--dataset", "cifar100", "--data-root", str(tmp_path / "data"), "--no-download", "--epochs", "1",
                 "--arch", "toy_mlp", "--device", "cpu", "--split-dir", str(tmp_path / "splits")])
    assert code == 2 and not marker.exists()


def test_a_download_that_never_answers_times_out(tmp_path):
    """A server that accepts the connection and never answers (a stalled proxy): the download gives up within
    its timeout and retries, with a message naming the URL, the folder and the offline instructions."""
    import socket
    import threading
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    accepted = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])  # keep the connection open, say nothing
            except OSError:
                pass
    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}/cifar-100-python.tar.gz"
    start = time.monotonic()
    try:
        with pytest.raises(D.DatasetError, match=rf"could not download cifar100 from {url} .*attempt 2: .*(timed out|"
                                                 rf"Timeout).*unpack it into {tmp_path}"):
            D.download_cifar(tmp_path, "cifar100", url=url, timeout=0.5, retries=2, wait=0.1)
    finally:
        stop.set()
        thread.join()
        for c in accepted:
            c.close()
        server.close()
    assert time.monotonic() - start < 10 and len(accepted) == 2


def test_image_folder_round_trip_and_layout_errors(tmp_path):
    rng = np.random.default_rng(0)
    written = {}
    for c in ("ant", "bee"):
        for i in range(3):
            img = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
            (tmp_path / "train" / c).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(tmp_path / "train" / c / f"{i}.png")
            written[(c, i)] = img
    x, y, classes = D.folder_to_tensor(tmp_path, "train")
    assert classes == ["ant", "bee"] and y.tolist() == [0, 0, 0, 1, 1, 1]
    for n, (c, i) in enumerate(sorted(written)):
        assert np.array_equal(x[n].permute(1, 2, 0).numpy(), written[(c, i)])
    (tmp_path / "val" / "ant").mkdir(parents=True)
    Image.fromarray(written[("ant", 0)]).save(tmp_path / "val" / "ant" / "0.png")
    with pytest.raises(D.DatasetError, match=r"val lacks class folders present in .*train: bee"):
        D.image_folder(tmp_path, "val")
    (tmp_path / "train" / "bee" / "3.png").write_bytes(b"not an image")
    with pytest.raises(D.DatasetError, match=r"cannot read image .*bee/3.png"):
        D.folder_to_tensor(tmp_path, "train")
    with pytest.raises(D.DatasetError, match=r"image folder .*test not found"):
        D.image_folder(tmp_path, "test")


def _tree(root, layout):
    """Write {split/class/name: uint8 HxWx3 array} as PNG files under root."""
    for name, img in layout.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / name)


def _img(value):
    return np.full((4, 4, 3), value, dtype=np.uint8)


def test_an_extra_class_in_a_split_is_named_not_shifted_into_every_label(tmp_path):
    _tree(tmp_path, {"train/ant/0.png": _img(1), "train/cat/0.png": _img(2),
                     "val/ant/0.png": _img(3), "val/bee/0.png": _img(4), "val/cat/0.png": _img(5)})
    with pytest.raises(D.DatasetError, match=r"val has class folders that .*train lacks: bee: every split needs "
                                             r"exactly the training split's classes"):
        D.image_folder(tmp_path, "val")


def test_hidden_entries_are_neither_classes_nor_images(tmp_path):
    _tree(tmp_path, {"train/ant/0.png": _img(1), "train/bee/0.png": _img(2),
                     "train/.ipynb_checkpoints/0.png": _img(9), "train/__MACOSX/0.png": _img(9),
                     "train/ant/._0.png": _img(9), "train/bee/.hidden/1.png": _img(9)})
    (tmp_path / "train" / "ant" / ".DS_Store").write_bytes(b"\0\0")
    x, y, classes = D.folder_to_tensor(tmp_path, "train")
    assert classes == ["ant", "bee"] and y.tolist() == [0, 1] and x[:, 0, 0, 0].tolist() == [1, 2]


def test_folder_links_are_not_followed_and_no_file_counts_twice(tmp_path):
    _tree(tmp_path, {"train/cat/0.png": _img(1), "train/cat/1.png": _img(2), "train/dog/0.png": _img(3)})
    os.symlink("../cat", tmp_path / "train" / "cat" / "loop")            # a loop: cat/loop/loop/... -> cat
    os.symlink("0.png", tmp_path / "train" / "cat" / "same.png")         # the same file under a second name
    tree = D.image_folder(tmp_path, "train")
    assert [os.path.basename(p) for p, _ in tree.samples] == ["0.png", "1.png", "0.png"]
    assert tree.targets == [0, 0, 1]


def test_images_in_a_format_the_dataset_skips_are_named_not_dropped(tmp_path):
    """torchvision reads only its extensions; a class's .gif images would silently leave it smaller than the folder
    shows. Files of no image kind (notes.txt, Tiny-ImageNet's boxes files) stay allowed."""
    _tree(tmp_path, {"train/cat/0.png": _img(1), "train/dog/1.png": _img(2)})
    Image.fromarray(_img(3)).save(tmp_path / "train" / "cat" / "2.gif")
    (tmp_path / "train" / "dog" / "dog_boxes.txt").write_text("1.png 0 0 4 4")
    with pytest.raises(D.DatasetError, match=r"^1 image files under \S*train are not read \(1 .gif; e.g. \S*cat/2.gif\): "
                                             r"the dataset reads only .jpg, .*convert them to PNG or JPEG"):
        D.folder_to_tensor(tmp_path, "train")
    Image.open(tmp_path / "train" / "cat" / "2.gif").convert("RGB").save(tmp_path / "train" / "cat" / "2.png")
    (tmp_path / "train" / "cat" / "2.gif").unlink()  # the fix the message gives
    x, y, classes = D.folder_to_tensor(tmp_path, "train")
    assert y.tolist() == [0, 0, 1] and x[:, 0, 0, 0].tolist() == [1, 3, 2]


def test_a_file_in_two_class_folders_is_refused_not_given_the_first_label(tmp_path):
    _tree(tmp_path, {"train/cat/0.png": _img(1), "train/dog/1.png": _img(2)})
    os.symlink(tmp_path / "train" / "cat" / "0.png", tmp_path / "train" / "dog" / "same.png")
    with pytest.raises(D.DatasetError, match=r"dog/same.png is the file cat/ holds too .*keep it in one class folder"):
        D.image_folder(tmp_path, "train")


def test_images_of_different_sizes_name_one_of_the_rare_size(tmp_path):
    _tree(tmp_path, {"train/cat/0.png": _img(1), "train/cat/1.png": _img(2), "train/dog/2.png": _img(3),
                     "train/dog/odd.png": np.zeros((6, 5, 3), np.uint8)})
    with pytest.raises(D.DatasetError, match=r"different sizes: .*train/dog/odd.png is 5x6 \(1 such\), 3 are 4x4: "
                                             r"resize them .*--dataset folder"):
        D.folder_to_tensor(tmp_path, "train")


def test_a_test_tree_of_another_image_size_is_refused_before_training(tmp_path):
    """A network that takes any input size (ResNet, Swin) would be tested at another resolution than it trained."""
    from types import SimpleNamespace
    from hdkdlib.data.bundle import _tensor_data
    _tree(tmp_path, {"train/cat/0.png": _img(1), "train/dog/1.png": _img(2),
                     "test/cat/2.png": np.zeros((8, 8, 3), np.uint8), "test/dog/3.png": np.zeros((8, 8, 3), np.uint8)})
    with pytest.raises(D.DatasetError, match=r"test holds \(8, 8\) images, .*train \(4, 4\): resize one tree"):
        _tensor_data(SimpleNamespace(dataset="folder32", data_root=str(tmp_path), download=False))


def test_file_names_that_are_not_utf8_are_fingerprinted(tmp_path):
    """A valid POSIX file name need not be UTF-8 (os.fsdecode maps its bytes to surrogates)."""
    from hdkdlib.data.bundle import files_fingerprint
    _tree(tmp_path, {"train/cat/0.png": _img(1)})
    odd = os.path.join(os.fsencode(tmp_path / "train" / "cat"), b"\xff\xfe.png")
    Image.fromarray(_img(2)).save(os.fsdecode(odd), format="PNG")
    tree = D.image_folder(tmp_path, "train")
    assert len(tree.samples) == 2 and files_fingerprint(tmp_path, tree)["sha256"]


def test_an_image_in_two_splits_is_refused(tmp_path):
    _tree(tmp_path, {"train/cat/0.png": _img(1), "train/cat/1.png": _img(2), "test/cat/9.png": _img(3)})
    os.symlink(tmp_path / "train" / "cat" / "1.png", tmp_path / "test" / "cat" / "copy.png")
    from hdkdlib.data.folder import check_disjoint
    with pytest.raises(D.DatasetError, match=r"image .*test/cat/copy.png is also in the train split .*must not share"):
        check_disjoint(tmp_path, ("train", "test"))


@pytest.mark.parametrize("mode, make, expected", [
    ("L", lambda: Image.new("L", (2, 2), 77), (77, 77, 77)),
    ("1", lambda: Image.new("1", (2, 2), 1), (255, 255, 255)),
    ("P", lambda: _palette_image(), (200, 10, 30)),
    ("RGBA", lambda: Image.new("RGBA", (2, 2), (10, 20, 30, 128)), (10, 20, 30)),
    ("LA", lambda: Image.new("LA", (2, 2), (90, 5)), (90, 90, 90)),
    ("CMYK", lambda: Image.new("CMYK", (2, 2), (0, 255, 255, 0)), (255, 0, 0)),
    ("CMYK", lambda: Image.new("CMYK", (2, 2), (10, 20, 30, 40)), (207, 198, 190)),  # (255-c)(255-k)/255
    ("I;16", lambda: Image.fromarray(np.full((2, 2), 32896, dtype=np.uint16)), (128, 128, 128)),  # 32896/257
    ("I;16", lambda: Image.fromarray(np.full((2, 2), 65535, dtype=np.uint16)), (255, 255, 255)),
    ("I", lambda: Image.fromarray(np.full((2, 2), 1028, dtype=np.int32), "I"), (4, 4, 4)),
])
def test_every_image_mode_decodes_to_the_right_8_bit_rgb_pixel(tmp_path, mode, make, expected):
    image = make()
    assert image.mode == mode
    path = tmp_path / ("x.tiff" if mode in ("CMYK", "I", "LA") else "x.png")
    image.save(path)
    assert tuple(np.asarray(read_image(str(path)))[1, 1].tolist()) == expected


def _palette_image():
    image = Image.new("P", (2, 2), 3)
    image.putpalette([0, 0, 0] * 3 + [200, 10, 30] + [0, 0, 0] * 252)
    return image


def test_a_mode_that_cannot_be_decoded_faithfully_is_refused_by_name(tmp_path):
    path = tmp_path / "x.tiff"
    Image.new("F", (2, 2), 0.5).save(path)
    with pytest.raises(D.DatasetError, match=r"image .*x.tiff: mode F cannot be converted to 8-bit RGB faithfully"):
        read_image(str(path))


def test_the_size_bound_is_ours_and_sits_where_evaluation_would_exceed_it():
    from hdkdlib.data.folder import EVAL_RESIZE, MAX_ASPECT, MAX_PIXELS, check_size
    assert MAX_PIXELS == 2 ** 26 < Image.MAX_IMAGE_PIXELS and MAX_ASPECT * EVAL_RESIZE ** 2 <= MAX_PIXELS
    check_size(1, MAX_ASPECT, "x.png")          # resized for evaluation: 256 x 262,144 pixels, at the bound
    check_size(MAX_PIXELS // 4096, 4096, "x.png")
    with pytest.raises(D.DatasetError, match=r"^image x.png is 1x1025 pixels, its longer side more than our bound of "
                                             r"1024 times its shorter \(resized to a shorter side of 256, as evaluation "
                                             r"does, it would be 256x262,400 pixels\): crop it"):
        check_size(1, MAX_ASPECT + 1, "x.png")
    with pytest.raises(D.DatasetError, match=r"^image x.png is 0x5 pixels: it has no pixels"):
        check_size(0, 5, "x.png")


def test_an_image_past_pillows_own_limit_gets_the_same_fix(tmp_path):
    side = int((2 * Image.MAX_IMAGE_PIXELS) ** 0.5) + 1  # Image.open itself refuses it
    Image.new("1", (side, side)).save(tmp_path / "bomb.png")
    with pytest.raises(D.DatasetError, match=r"^image \S*bomb.png: Image size .* exceeds limit .* \(our bound is "
                                             r"67,108,864 pixels per image\): downscale it below that, or move it out"):
        read_image(str(tmp_path / "bomb.png"))


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("loader", ["image_folder", "folder_to_tensor"])
@pytest.mark.parametrize("size, message", [
    ((1, 1100), r"is 1x1100 pixels, its longer side more than our bound of 1024 times its shorter \(resized to a "
                r"shorter side of 256, as evaluation does, it would be 256x281,600 pixels\): crop it to a side ratio "
                r"of at most 1024, or move it out of the data folder$"),
    ((8193, 8192), r"is 8193x8192 pixels \(67,117,056\), above our bound of 67,108,864 pixels per image: downscale it "
                   r"below that, or move it out of the data folder$"),
], ids=["elongated", "too-many-pixels"])
def test_an_image_too_large_to_decode_is_refused_by_name_before_decoding(tmp_path, split, loader, size, message):
    """A 196-byte 1 x 40,000 PNG asked for 7.7 GB at evaluation (Resize(256)); an image of more pixels than our
    bound but fewer than Pillow's was decoded whole. Both are refused, in every split and reader, as one line."""
    D.write_fake_image_folder(tmp_path, classes=["a", "b"], n_per_class=(2, 1))
    before = D.folder_to_tensor(tmp_path, split)
    Image.new("1", size).save(tmp_path / split / "b" / "big.png")
    read = ((lambda: [item for item in D.image_folder(tmp_path, split)]) if loader == "image_folder"
            else (lambda: D.folder_to_tensor(tmp_path, split)))
    with pytest.raises(D.DatasetError, match=rf"^image \S*{split}/b/big.png {message}"):
        read()
    (tmp_path / split / "b" / "big.png").rename(tmp_path / "big.png")  # the fix the message gives
    after = D.folder_to_tensor(tmp_path, split)
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])


def test_a_strip_image_in_a_dataloader_worker_is_one_line_not_a_memory_error(tmp_path):
    """The issue's 196-byte 1 x 40,000 PNG (7.7 GB once evaluation resizes it): read_image refuses it before
    decoding; through a DataLoader worker the refusal reaches the command line as its one line. (The worker is
    fed a 1 x 1,100 strip, which costs 216 MB, not 7.7 GB, should the bound ever be lost.)"""
    from hdkdlib import cli
    Image.new("RGB", (1, 40000)).save(tmp_path / "strip.png")
    assert (tmp_path / "strip.png").stat().st_size < 300
    with pytest.raises(D.DatasetError, match=r"^image \S*strip.png is 1x40000 pixels, its longer side more than our "
                                             r"bound of 1024 times its shorter \(resized to a shorter side of 256, as "
                                             r"evaluation does, it would be 256x10,240,000 pixels\)"):
        read_image(str(tmp_path / "strip.png"))
    D.write_fake_image_folder(tmp_path / "data", classes=["a", "b"], n_per_class=(2, 1))
    Image.new("RGB", (1, 1100)).save(tmp_path / "data" / "val" / "a" / "strip.png")
    with pytest.raises(D.DatasetError, match=r"in DataLoader worker") as caught:
        list(torch.utils.data.DataLoader(D.image_folder(tmp_path / "data", "val"), batch_size=2, num_workers=1))
    assert re.fullmatch(r"image \S*val/a/strip.png is 1x1100 pixels, its longer side more than our bound of 1024 "
                        r"times its shorter \(resized to a shorter side of 256, as evaluation does, it would be "
                        r"256x281,600 pixels\): crop it to a side ratio of at most 1024, or move it out of the "
                        r"data folder", cli.error_line(caught.value))


def test_a_strip_image_in_the_test_split_is_refused_before_training(tmp_path, capsys):
    """The test split is read only at the end of a run: its images' headers are checked when the data is built,
    so a 1 x 40,000 PNG there stops the run before anything is trained or written, not after the training."""
    from hdkdlib.train import main
    D.write_fake_image_folder(tmp_path / "data", classes=["a", "b"], n_per_class=(6, 1), size=40)
    Image.new("RGB", (1, 40000)).save(tmp_path / "data" / "val" / "b" / "strip.png")
    out = tmp_path / "run"
    assert main(["--dataset", "folder", "--data-root", str(tmp_path / "data"), "--split-dir", str(tmp_path / "s"),
                 "--val-per-class", "1", "--arch", "toy_mlp", "--method", "ce", "--epochs", "1", "--batch-size", "2",
                 "--workers", "0", "--device", "cpu", "--no-progress", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "val/b/strip.png is 1x40000 pixels" in err[0] and "--resume" not in err[0], err
    assert not out.exists()


def test_holding_out_every_image_of_a_class_says_so(tmp_path):
    with pytest.raises(ValueError, match=r"class 0 has 100 images, all held out for validation \(val_per_class 100\): "
                                         r"none is left for training; lower val_per_class"):
        splits.make_split(LABELS, val_per_class=100)


def test_fake_image_folder_writer_and_imagenet_transforms(tmp_path):
    D.write_fake_image_folder(tmp_path, classes=("a", "b"), n_per_class=(3, 1), ext=".jpg", size=48)
    train, val = D.image_folder(tmp_path, "train"), D.image_folder(tmp_path, "val")
    assert len(train) == 6 and len(val) == 2 and train.classes == ["a", "b"]
    assert train[0][0].shape == (3, 224, 224) and val[0][0].shape == (3, 224, 224)


# --- splits ---------------------------------------------------------------------------------------
LABELS = np.arange(1000) % 10  # 100 images of each of 10 classes, classes interleaved


def test_split_is_balanced_disjoint_and_pinned_across_machines():
    s = splits.make_split(LABELS, val_per_class=10, seed=0, dataset="toy")
    val, train = np.array(s["val"]), np.array(s["train"])
    assert len(set(val) & set(train)) == 0 and len(val) + len(train) == 1000
    assert np.bincount(LABELS[val]).tolist() == [10] * 10
    # BLAKE2b-keyed order: the same on every machine and numpy version. If this changes, every
    # committed split file would silently mean something else.
    assert s["checksum"] == PINNED_CHECKSUM
    limited = splits.make_split(LABELS, val_per_class=10, train_per_class=25, seed=0)
    assert limited["val"] == s["val"]  # the same held-out set for every protocol with this seed
    assert np.bincount(LABELS[limited["train"]]).tolist() == [25] * 10
    assert set(limited["train"]) <= set(s["train"])
    assert splits.make_split(LABELS, val_per_class=10, seed=1)["val"] != s["val"]


PINNED_CHECKSUM = "04d8945d9681a0ebd9b2f64b9036f7e217976adfec1cf7b11a82151a82001cb6"


def test_split_does_not_depend_on_models_or_global_rng():
    torch.manual_seed(123)
    a = splits.make_split(LABELS, val_per_class=5)
    models.build("msdnet_cifar_budget", 10)  # consumes the global RNG, as the peers' code did
    np.random.seed(7)
    b = splits.make_split(LABELS, val_per_class=5)
    assert a["checksum"] == b["checksum"]


def test_split_file_is_reused_and_checked(tmp_path):
    path = tmp_path / "toy.json"
    s1 = splits.load_or_create(LABELS, dataset="toy", val_per_class=10, path=path)
    stamp = path.stat().st_mtime_ns
    s2 = splits.load_or_create(LABELS, dataset="toy", val_per_class=10, path=path)
    assert s1 == s2 and path.stat().st_mtime_ns == stamp
    with pytest.raises(D.DatasetError, match=r"toy.json was drawn from other labels"):
        splits.load_or_create(np.roll(LABELS, 1), dataset="toy", val_per_class=10, path=path)
    content = json.loads(path.read_text())
    content["val"][0] += 1
    path.write_text(json.dumps(content))
    with pytest.raises(D.DatasetError, match=r"toy.json: its indices do not match its checksum .*restore it \(git checkout -- .*toy.json\); otherwise delete it and it is drawn again"):
        splits.load_or_create(LABELS, dataset="toy", val_per_class=10, path=path)
    assert json.loads(path.read_text()) == content  # a failed load never rewrites the file
    with pytest.raises(ValueError, match="class 0 has 100 images; the split needs 10 for validation \\+ 95 for training: lower "
                                         "--val-per-class or --n-per-class"):
        splits.make_split(LABELS, val_per_class=10, train_per_class=95)


def _rechecksummed(path, edit):
    """The split file at path, edited and given a matching checksum with the project's own function (what a
    careless script or a hostile user can do)."""
    content = json.loads(path.read_text())
    edit(content)
    content["checksum"] = splits._checksum(content)
    path.write_text(json.dumps(content))


@pytest.mark.parametrize("edit, message", [
    (lambda s: s["train"].append(s["val"][0]), r"index \d+ is in both 'train' and 'val' \(validation images would leak"),
    (lambda s: s["val"].append(s["val"][3]), r"'val' holds index \d+ more than once"),
    (lambda s: s["train"].insert(0, -1), r"'train' holds index -1, outside \[0, 999\]"),
    (lambda s: s["train"].append(1000), r"'train' holds index 1000, outside \[0, 999\]"),
    (lambda s: s["val"].append(1.5), r"'val' holds 1.5, not an integer index"),
    (lambda s: s["val"].append(True), r"'val' holds True, not an integer index"),
    (lambda s: s["val"].append(None), r"'val' holds None, not an integer index"),
    (lambda s: s.update(train={"0": 1}), r"'train' must be a list of image indices, not dict"),
])
def test_split_contents_are_checked_even_with_a_matching_checksum(tmp_path, edit, message):
    path = tmp_path / "toy.json"
    splits.load_or_create(LABELS, dataset="toy", val_per_class=10, train_per_class=50, path=path)
    _rechecksummed(path, edit)
    before = path.read_text()
    with pytest.raises(D.DatasetError, match=rf"^split file .*toy.json: {message}.*restore it \(git checkout"):
        splits.load_or_create(LABELS, dataset="toy", val_per_class=10, train_per_class=50, path=path)
    assert path.read_text() == before  # a refused file is left as it is, for the user to look at


def test_a_split_file_of_another_protocol_is_refused_not_trained_on(tmp_path):
    """Another protocol's split file under this protocol's name (copied, or its fields edited: the checksum covers
    the indices only) is refused naming both protocols, and left as it is; this protocol's own file loads."""
    theirs, ours = tmp_path / "n40.json", tmp_path / "n50.json"
    splits.load_or_create(LABELS, dataset="toy", val_per_class=10, train_per_class=40, path=theirs)
    ours.write_bytes(theirs.read_bytes())
    with pytest.raises(D.DatasetError, match=r"n50.json holds another protocol's split \(seed 0, 10 held-out and 40 "
                                             r"training images per class.* asks seed 0, 10 held-out and 50 training"):
        splits.load_or_create(LABELS, dataset="toy", val_per_class=10, train_per_class=50, path=ours)
    content = json.loads(theirs.read_text())
    ours.write_text(json.dumps(dict(content, train_per_class=50, protocol="limited(50)")))  # the label, not the images
    with pytest.raises(D.DatasetError, match=r"per class it holds 10 and 40 at most\) where this run asks"):
        splits.load_or_create(LABELS, dataset="toy", val_per_class=10, train_per_class=50, path=ours)
    assert json.loads(ours.read_text())["train"] == content["train"]
    with pytest.raises(D.DatasetError, match=r"holds another protocol's split \(seed 0.* asks seed 3"):
        splits.load_or_create(LABELS, dataset="toy", val_per_class=10, train_per_class=40, seed=3, path=theirs)
    assert splits.load_or_create(LABELS, dataset="toy", val_per_class=10, train_per_class=40, path=theirs) == content


@pytest.mark.parametrize("edit", ["another seed's draw, its seed field edited", "two images swapped"])
def test_a_split_file_that_is_not_the_seeds_draw_is_refused(tmp_path, edit):
    """The same seed, sizes and per-class counts, a matching checksum, other images: refused, left as it is."""
    path = tmp_path / "toy.json"
    if edit == "two images swapped":
        splits.load_or_create(LABELS, dataset="toy", val_per_class=10, train_per_class=50, path=path)
        def swap(content):  # a held-out image of class 0 and a training image of class 0 change places
            v, t = content["val"][0], next(i for i in content["train"] if LABELS[i] == LABELS[content["val"][0]])
            content["val"] = sorted(content["val"][1:] + [t])
            content["train"] = sorted([i for i in content["train"] if i != t] + [v])
        _rechecksummed(path, swap)
    else:
        splits.load_or_create(LABELS, dataset="toy", val_per_class=10, train_per_class=50, seed=1, path=path)
        _rechecksummed(path, lambda content: content.update(seed=0))
    before = path.read_text()
    with pytest.raises(D.DatasetError, match=r"toy.json holds other images than seed 0's draw .*restore it"):
        splits.load_or_create(LABELS, dataset="toy", val_per_class=10, train_per_class=50, path=path)
    assert path.read_text() == before


@pytest.mark.parametrize("edit, message", [
    (dict(num_classes=100), r"its num_classes 100 is not its draw's \(10\)"),
    (dict(dataset="cifar100", n_total=50000), r"its dataset 'cifar100', n_total 50000 are not its draw's \('toy', 1000\)"),
    (dict(version=2), r"its version 2 is not its draw's \(1\)")])
def test_a_split_files_description_must_be_its_draws(tmp_path, edit, message):
    """The fields that describe a split go into every run's config.json: edited ones are refused, not recorded."""
    path = tmp_path / "toy.json"
    splits.load_or_create(LABELS, dataset="toy", val_per_class=10, train_per_class=50, path=path)
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    before = path.read_text()
    with pytest.raises(D.DatasetError, match=rf"^split file .*toy.json: {message}; if it is committed, restore it"):
        splits.load_or_create(LABELS, dataset="toy", val_per_class=10, train_per_class=50, path=path)
    assert path.read_text() == before


def test_a_split_file_that_holds_no_split_is_one_line(tmp_path):
    path = tmp_path / "toy.json"
    for text in ("[1, 2, 3]", '{"train": [1]}'):
        path.write_text(text)
        with pytest.raises(D.DatasetError, match=r"toy.json does not hold a split \(a JSON object with index lists"):
            splits.load_or_create(LABELS, dataset="toy", val_per_class=10, path=path)


# --- GPU-resident loader (runs on CPU here) ---------------------------------------------------------
def _loader(seed=0, n=200, **kw):
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    y = torch.arange(n) % 10
    return D.GpuLoader(x, y, 32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), seed=seed, **kw), x, y


def test_gpu_loader_is_seeded_per_epoch():
    a, _, _ = _loader(seed=3)
    b, _, _ = _loader(seed=3)
    for (xa, ya), (xb, yb) in zip(a.batches(0), b.batches(0)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    first = [yb for _, yb in a.batches(0)]
    second = [yb for _, yb in a.batches(1)]
    assert not all(torch.equal(p, q) for p, q in zip(first, second))
    resumed = list(a.batches(0, start=3))  # a resumed run starts mid-epoch with the same batches
    assert all(torch.equal(p[0], q[0]) for p, q in zip(resumed, list(a.batches(0))[3:]))


def test_gpu_loader_crops_inside_padded_image_and_normalises():
    loader, x, y = _loader(seed=1)
    order, offsets, flips = loader.epoch_plan(0)
    assert offsets.min() >= 0 and offsets.max() <= 8
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    mean = torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1) * 255
    std = torch.tensor([0.2, 0.25, 0.3]).view(3, 1, 1) * 255
    xb, yb = next(loader.batches(0))
    for i in range(len(yb)):
        j, (r, c) = order[i], offsets[i].tolist()
        crop = padded[j, :, r:r + 32, c:c + 32]
        if flips[i]:
            crop = crop.flip(2)
        torch.testing.assert_close(xb[i], (crop.float() - mean) / std)
        assert yb[i] == y[j]
    plain = D.GpuLoader(x, y, 50, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), train=False)
    xv, yv = next(iter(plain))
    torch.testing.assert_close(xv, (x[:50].float() - mean) / std)  # validation: never augmented
    assert len(plain) == 4 and torch.equal(yv, y[:50])


def test_gpu_loader_draws_an_epoch_on_the_host_whatever_its_device():
    """A seed means the same batches on every device (CPU and GPU runs of one seed pair in a study): the plan is
    the host generator's stream for (seed, epoch), then moved; a device's own generator would give other numbers.
    The meta device stands in for a GPU here: it has no generator, so a draw there fails."""
    from hdkdlib.data.order import epoch_seed
    loader, _, _ = _loader(seed=3)
    g = torch.Generator().manual_seed(epoch_seed(3, 2))
    n = len(loader.labels)
    expected = (torch.randperm(n, generator=g), torch.randint(0, 9, (n, 2), generator=g), torch.rand(n, generator=g) < 0.5)
    assert all(torch.equal(a, b) for a, b in zip(loader.epoch_plan(2), expected))
    loader.device = torch.device("meta")
    assert [(t.device.type, t.shape) for t in loader.epoch_plan(2)] == [("meta", e.shape) for e in expected]


def test_gpu_loader_flips_and_offsets_are_uniform():
    loader, _, _ = _loader(seed=0, n=20000)
    _, offsets, flips = loader.epoch_plan(0)
    n = len(flips)
    assert abs(flips.float().mean().item() - 0.5) < 4 * (0.25 / n) ** 0.5
    counts = torch.bincount(offsets.flatten(), minlength=9).float()
    expected = 2 * n / 9
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 26.1  # 99.9% quantile of chi-square with 8 degrees of freedom


def test_synthetic_images_are_learnable_and_difficulty_matters():
    def centroid_accuracy(difficulty):
        # class means from one draw, tested on another draw of the same classes (as train and test sets)
        x, y = D.synthetic_images(1000, num_classes=5, difficulty=difficulty, seed=0)
        xt, yt = D.synthetic_images(1000, num_classes=5, difficulty=difficulty, seed=1)
        means = torch.stack([x.float().flatten(1)[y == c].mean(0) for c in range(5)])
        pred = torch.cdist(xt.float().flatten(1), means).argmin(1)
        return (pred == yt).float().mean().item()

    easy, hard = centroid_accuracy(0.1), centroid_accuracy(0.9)
    assert easy > 0.6 and easy > hard > 0.2


def test_an_empty_class_folder_is_named_with_the_fix(tmp_path):
    D.write_fake_image_folder(tmp_path, classes=["a", "b", "c"], n_per_class=(2, 1))
    for f in (tmp_path / "train" / "b").iterdir():
        f.unlink()
    with pytest.raises(D.DatasetError, match=r"class folder .*train/b holds no images \(it is empty\): every class "
                                             r"of every split needs at least one image file"):
        D.folder_to_tensor(tmp_path, "train")


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("loader", ["image_folder", "folder_to_tensor"])
def test_a_class_folder_without_images_is_no_class(tmp_path, split, loader):
    """A class folder holding only files the dataset skips (notes.txt, a .gif, a hidden file) is refused in every
    split and by both readers, instead of becoming a class no image has (an extra output; top-5 of 1.0)."""
    D.write_fake_image_folder(tmp_path, classes=["a", "b", "c"], n_per_class=(2, 1))
    before = D.folder_to_tensor(tmp_path, split)
    for s in ("train", "val"):
        (tmp_path / s / "notes").mkdir()
        (tmp_path / s / "notes" / "notes.txt").write_text("to do")
        (tmp_path / s / "notes" / ".DS_Store").write_bytes(b"\0")
    with pytest.raises(D.DatasetError, match=rf"^class folder \S*{split}/notes holds no images \(it holds only "
                                             r"notes.txt\): every class of every split needs at least one image file "
                                             r"\(.jpg, .jpeg, .png.*\); add images to it, or move the folder notes "
                                             rf"out of every split of {re.escape(str(tmp_path))}$"):
        getattr(D, loader)(tmp_path, split)
    for s in ("train", "val"):  # the fix the message gives works, and the data reads as before
        (tmp_path / s / "notes").rename(tmp_path / f"notes-{s}")
    after = D.folder_to_tensor(tmp_path, split)
    assert after[2] == before[2] == ["a", "b", "c"]
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    assert len(D.image_folder(tmp_path, split).classes) == 3


@pytest.mark.parametrize("channel, name", [(0, "red"), (2, "blue")])
def test_a_channel_of_one_value_is_named_not_left_to_become_nan_inputs(tmp_path, capsys, channel, name):
    """Training images whose channel holds one value (std 0) made every normalised input NaN, and the run
    stopped on a non-finite loss advising a lower lr. build_data names the channel and the data instead."""
    from hdkdlib.config import TrainConfig
    from hdkdlib.data.bundle import build_data
    from hdkdlib.train import main
    root = D.write_fake_image_folder(tmp_path / "data", classes=["a", "b"], n_per_class=(12, 2))
    cfg = TrainConfig(dataset="folder32", data_root=str(root), split_dir=str(tmp_path / "splits"), batch_size=8,
                      val_per_class=2)
    good = build_data(cfg, torch.device("cpu"))
    pixels = good.train.images[:, :, 4:-4, 4:-4].float() / 255  # the training images, unpadded
    assert good.std == tuple(pixels.std((0, 2, 3)).tolist()) and min(good.std) > 0
    paths = sorted(root.rglob("*.png"))
    for path in paths:
        image = np.array(Image.open(path))
        image[..., channel] = 40
        Image.fromarray(image).save(path)
    with pytest.raises(D.DatasetError, match=rf"^folder32 data in {re.escape(str(root.resolve()))}: channel {channel} "
                                             rf"\({name}\) is 40 in every pixel of the 20 training images, so its "
                                             r"standard deviation is 0 and the normalised inputs would be NaN; check "
                                             r"the data"):
        build_data(cfg, torch.device("cpu"))
    code = main(["--dataset", "folder32", "--data-root", str(root), "--epochs", "1", "--arch", "toy_mlp",
                 "--device", "cpu", "--batch-size", "8", "--val-per-class", "2", "--split-dir", str(tmp_path / "splits"),
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and f"channel {channel} ({name}) is 40 in every pixel" in err and "Lower lr" not in err
    image = np.array(Image.open(paths[0]))  # one pixel of another value: a channel that can be normalised
    image[0, 0, channel] = 41
    Image.fromarray(image).save(paths[0])
    bundle = build_data(cfg, torch.device("cpu"))
    assert all(torch.isfinite(x).all() for x, _ in bundle.train.batches(0))


@pytest.mark.parametrize("std", [(0.2, 0.0, 0.3), (0.2, float("nan"), 0.3), (0.2, 0.3)])
def test_gpu_loader_refuses_statistics_that_make_nan_inputs(std):
    x, y = torch.zeros((4, 3, 8, 8), dtype=torch.uint8), torch.arange(4)
    with pytest.raises(ValueError, match=r"mean and std must be 3 finite values per channel, std > 0; got mean "):
        D.GpuLoader(x, y, 2, mean=(0.5, 0.5, 0.5), std=std)
